"""The built-in prompt set the teacher answers to make its own training data.

Written for this project (self-data distillation, METHODS.md section 5): varied
topics crossed with varied instruction types, plus standalone tasks (arithmetic,
rewriting, lists, code, reasoning). None is a benchmark prompt. Every eighth
prompt is held out for evaluation and never trained on.

Change the text and you must bump ``PROMPT_SET_VERSION`` (it keys the data cache).
"""

from __future__ import annotations

PROMPT_SET_VERSION = 1

TOPICS = (
    "photosynthesis", "the water cycle", "volcanoes", "the moon's phases", "black holes",
    "honeybees", "coral reefs", "the human heart", "vaccines", "sleep",
    "the printing press", "the Roman roads", "the Silk Road", "ancient Egyptian pyramids",
    "the invention of the telephone", "the history of chess", "jazz music", "the violin",
    "watercolor painting", "haiku poetry", "bread baking", "composting", "growing tomatoes",
    "saving money", "compound interest", "starting a small business", "public libraries",
    "recycling plastic", "solar panels", "wind turbines", "electric cars", "how a bicycle works",
    "how airplanes fly", "how a refrigerator works", "the internet", "passwords and security",
    "databases", "spreadsheets", "learning a new language", "public speaking", "time management",
    "team sports", "marathon training", "stretching", "mountain hiking", "bird migration",
    "the Amazon rainforest", "deserts",
)

TEMPLATES = (
    "Explain {t} to a curious ten-year-old.",
    "Write a short paragraph about {t}.",
    "Give three interesting facts about {t}.",
    "What are common misconceptions about {t}?",
    "Summarize the most important ideas about {t} in a few sentences.",
    "Write two questions a student might ask about {t}, and answer them.",
    "Describe {t} as if you were writing an encyclopedia entry.",
    "What would someone new to {t} need to know first?",
)

STANDALONE = (
    "What is 17 multiplied by 23? Show your steps.",
    "If a train travels 180 kilometers in 2 hours, what is its average speed?",
    "A shop sells pens at 3 for 2 dollars. How much do 12 pens cost?",
    "Convert 5 kilometers to miles and explain the conversion.",
    "What is the sum of the first ten positive integers?",
    "Rewrite this sentence in a formal tone: 'hey, can u send me the report asap?'",
    "Rewrite this sentence more simply: 'The committee reached a consensus after prolonged deliberation.'",
    "Correct the grammar: 'She don't like apples and he have three cat.'",
    "Turn this into a polite email: 'The meeting is moved to Friday.'",
    "List five fruits that are high in vitamin C.",
    "List the planets of the solar system in order from the sun.",
    "Give me a packing list for a weekend camping trip.",
    "Suggest five names for a friendly neighborhood bakery.",
    "Write a Python function that returns the factorial of a number.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a for loop does in programming, with a short example.",
    "What is the difference between a list and a dictionary in Python?",
    "Write a short story about a robot who learns to paint.",
    "Write a four-line poem about autumn leaves.",
    "Write a limerick about a forgetful cat.",
    "Describe a sunrise over the ocean in vivid language.",
    "Give advice to someone preparing for their first job interview.",
    "How can I make my mornings less stressful?",
    "What are the pros and cons of working from home?",
    "Compare cats and dogs as pets.",
    "Why is the sky blue?",
    "Why do we have seasons on Earth?",
    "How does a rainbow form?",
    "What causes thunder?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Explain the difference between weather and climate.",
    "What is the difference between a virus and a bacterium?",
    "Write a recipe for a simple vegetable soup.",
    "Plan a one-day itinerary for a visit to a museum city.",
    "Give step-by-step instructions for tying a shoelace.",
    "Sort these numbers from smallest to largest: 42, 7, 19, 3, 88, 25.",
    "If all roses are flowers and some flowers fade quickly, can we conclude that some roses fade quickly? Explain.",
    "A farmer has 15 sheep and all but 8 run away. How many are left? Explain.",
    "Explain what a budget is and how to make one.",
    "Write a thank-you note to a teacher.",
)


def prompt_set() -> list[str]:
    """Every prompt, in a fixed interleaved order (topics vary fastest)."""
    crossed = [TEMPLATES[(i + j) % len(TEMPLATES)].format(t=t) for j in range(len(TEMPLATES)) for i, t in enumerate(TOPICS)]
    out: list[str] = []
    s = 0
    for i, p in enumerate(crossed):
        out.append(p)
        if i % 9 == 8 and s < len(STANDALONE):
            out.append(STANDALONE[s])
            s += 1
    out.extend(STANDALONE[s:])
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def split_prompts(train_count: int, eval_count: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out evaluation prompts); every eighth prompt is held out."""
    prompts = prompt_set()
    held = [p for i, p in enumerate(prompts) if i % 8 == 7]
    train = [p for i, p in enumerate(prompts) if i % 8 != 7]
    return train[:train_count], held[:eval_count]
