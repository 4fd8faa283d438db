"""The built-in prompt set the teacher answers to make its own training data.

Written for this project (self-data distillation, METHODS.md section 5). Six kinds of text, so
that a model recovered on the teacher's answers holds on text nobody tuned on: explanation
(everyday topics x instruction types), code (programming tasks x request styles), technical
writing (computing topics x documentation styles), narrative, dialogue, lists, and math word
problems (numbers drawn from a fixed seed), plus standalone tasks (rewriting, reasoning).
The kinds are interleaved so that any prefix of the set covers all of them. None is a
benchmark prompt. Every eighth prompt of these is held out for evaluation and never trained on.

Since version 3 a seventh kind, encyclopedia articles (history, places, people, species,
storms, ships, roads, sport, music, games), is interleaved into the *training* prompts only:
their answers are kept as plain prose without the chat wrapper, the kind of text an
encyclopedia (and wikitext) holds and chat answers do not. The held-out prompts are those of
version 2, so the ``answers`` domain is unchanged.

Change the training text and you must bump ``PROMPT_SET_VERSION``; change the held-out prompts
and you must bump ``HELDOUT_SET_VERSION`` (they key the data cache).
"""

from __future__ import annotations

PROMPT_SET_VERSION = 3  # the training prompts
HELDOUT_SET_VERSION = 2  # the held-out prompts (the `answers` domain)

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


CODE_TASKS = (
    "reverses the order of the words in a sentence", "counts how often each word appears in a text file",
    "merges two sorted lists into one sorted list", "parses a date written as YYYY-MM-DD and returns the weekday",
    "computes a moving average over a list of numbers", "finds duplicate files in a folder by hashing their contents",
    "checks whether a string is a plausible email address", "flattens an arbitrarily nested list",
    "performs binary search on a sorted list", "reads a CSV file and sums one of its columns",
    "retries a failing call with exponential backoff", "implements a stack with push, pop and peek",
    "returns the n-th Fibonacci number without recursion", "tests whether a number is prime",
    "groups a list of dictionaries by the value of one key", "removes duplicates from a list but keeps the order",
    "splits a list into chunks of a given size", "formats a number of bytes as a human-readable size",
    "lists the ten largest files under a directory", "parses command-line options with argparse",
    "times a block of code with a context manager", "serializes a dataclass to JSON and back",
    "yields the lines of a large file lazily", "computes the edit distance between two strings",
    "rotates a square matrix by 90 degrees", "counts events safely from several threads",
    "implements a least-recently-used cache", "evaluates an expression in reverse Polish notation",
    "converts Roman numerals to integers", "pretty-prints a nested dictionary with indentation",
    "validates a 9x9 Sudoku grid", "computes the greatest common divisor of two integers",
    "finds the longest common prefix of a list of strings", "tokenizes a simple arithmetic expression",
    "reads a configuration file in INI format", "renames every file in a folder to lower case",
)

CODE_TEMPLATES = (
    "Write a Python function that {t}. Include a docstring and type hints.",
    "Write Python code that {t}, then explain how it works line by line.",
    "Write a Python function that {t}, and two pytest unit tests for it.",
    "What edge cases does a function that {t} have to handle? Show an implementation in Python.",
)

TECH_TOPICS = (
    "hash tables", "TCP and UDP", "garbage collection", "regular expressions", "Unicode and UTF-8",
    "file systems", "virtual memory", "HTTP requests and responses", "DNS", "public-key cryptography",
    "version control with git", "unit testing", "recursion", "big-O notation", "sorting algorithms",
    "threads and processes", "Python decorators", "Python generators", "exceptions and error handling",
    "the JSON format", "SQL joins", "REST APIs", "caching", "floating-point numbers",
    "compilers and interpreters", "binary numbers", "logging in applications", "the Unix command line",
)

TECH_TEMPLATES = (
    "Explain {t} to a junior programmer, with a small example.",
    "Write the section of a library manual that introduces {t}.",
    "What are the trade-offs and common pitfalls of {t}?",
    "Describe a bug that is typical of {t} and how to fix it.",
)

STORY_CHARACTERS = (
    "a lighthouse keeper", "a retired detective", "a young inventor", "a lost dog", "a village baker",
    "an astronaut on a long mission", "two rival chess players", "a shy librarian", "a street musician",
    "a farmer during a drought", "a girl who finds an old map", "a ship's cook",
)

STORY_SITUATIONS = (
    "discovers something unexpected in the attic", "has to make a difficult choice",
    "meets a stranger on a night train", "tries to fix a mistake before anyone notices",
    "returns home after twenty years", "is snowed in for a week",
)

DIALOGUE_PAIRS = (
    ("a customer", "a bookshop owner"), ("a patient", "a doctor"), ("two friends", None),
    ("a student", "a professor"), ("a tourist", "a local guide"), ("a manager", "a new employee"),
    ("a child", "a grandparent"), ("a programmer", "a product designer"),
)

DIALOGUE_SUBJECTS = (
    "planning a weekend trip", "a book they both read", "a problem at work", "learning to cook",
    "whether to adopt a pet", "a strange noise in the house", "saving for a big purchase",
    "a bug that only happens on Fridays",
)

LIST_SUBJECTS = (
    "habits that improve sleep", "questions to ask before buying a used car", "ways to reduce food waste",
    "classic novels and why they matter", "tips for writing clear emails", "board games for families",
    "steps to prepare for a job interview", "common causes of slow computers", "birds you can see in a city park",
    "ideas for a rainy afternoon", "mistakes beginners make when learning to program",
    "things to check before a long bicycle ride", "uses for baking soda", "inventions of the nineteenth century",
    "ways to learn vocabulary in a new language", "features of a good password manager",
)

LIST_TEMPLATES = (
    "List eight {t}, with one sentence about each.",
    "Make a numbered list of {t}, most important first, and explain your order.",
)

MATH_TEMPLATES = (
    "A bakery bakes {a} loaves a day and sells {b} of them. How many loaves are left after {c} days? Show your steps.",
    "A tank holds {a} liters and is filled at {b} liters per minute. How long does it take to fill it from empty?",
    "What is {a} multiplied by {b}, minus {c}? Show each step.",
    "A shirt costs {a} dollars and is on sale for {b} percent off. What is the sale price?",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
    "If {a} workers build a wall in {b} days, how long would {c} workers take at the same rate?",
    "Split {a} apples among {b} children equally. How many does each get, and how many are left?",
    "A car uses {b} liters of fuel per 100 km. How much fuel does it need for {a} km?",
    "Solve for x: {b}x + {c} = {a}. Explain each step.",
    "What is the average of {a}, {b} and {c}?",
)

MATH_PROBLEMS = 40

ARTICLE_SUBJECTS = (
    "the Battle of Hastings", "the Hundred Years' War", "the Great Fire of London", "the Byzantine Empire",
    "the Hanseatic League", "the Ottoman siege of Vienna", "the Meiji Restoration", "the War of 1812",
    "a hurricane that struck the Gulf of Mexico in the 1990s", "a tropical storm in the western Pacific",
    "the 1906 San Francisco earthquake", "the eruption of Mount Tambora",
    "a Royal Navy battleship of the First World War", "a United States Navy destroyer of the Second World War",
    "a nineteenth-century clipper ship", "a state highway in Michigan", "a railway line in northern England",
    "a medieval cathedral in France", "a Roman fort on Hadrian's Wall", "a lighthouse on the coast of Maine",
    "the city of Kraków", "the river Danube", "the island of Tasmania", "a national park in the Rocky Mountains",
    "a small town in Ohio", "the Atacama Desert",
    "a nineteenth-century Irish novelist", "an English football club founded in the 1880s",
    "a Brazilian footballer of the 1970s", "an American baseball pitcher of the 1920s", "a cricket test series",
    "a Renaissance painter from Venice", "a German composer of the Baroque era", "a suffragette from Manchester",
    "a Roman emperor of the third century", "an Australian prime minister",
    "the European robin", "a species of fungus found in pine forests", "the blue whale", "a species of hawk",
    "a flowering plant native to South Africa", "a dinosaur of the Late Cretaceous",
    "a rock album released in 1971", "a jazz standard of the 1930s", "a hit single of the 1980s",
    "a role-playing video game released in 1998", "an episode of a long-running animated television series",
    "a science fiction novel of the 1950s",
)

ARTICLE_TEMPLATES = (
    "Write an encyclopedia article about {t}, with a lead section and sections on its history and legacy.",
    "Write the History section of a Wikipedia-style article about {t}.",
    "Write a detailed, neutral encyclopedia entry about {t}, as prose paragraphs without lists.",
)

# one training prompt in this many is an encyclopedia article (their answers are plain prose)
ARTICLE_EVERY = 4


def _math_prompts() -> list[str]:
    import random

    rng = random.Random(20261201)
    out = []
    for i in range(MATH_PROBLEMS):
        t = MATH_TEMPLATES[i % len(MATH_TEMPLATES)]
        out.append(t.format(a=rng.randint(12, 480), b=rng.randint(2, 40), c=rng.randint(2, 12)))
    return out


def _kinds() -> list[list[str]]:
    """The prompt set by kind, each in a fixed order (varying fastest in its first field)."""
    def crossed(templates, items):
        return [templates[(i + j) % len(templates)].format(t=t) for j in range(len(templates)) for i, t in enumerate(items)]

    explain = crossed(TEMPLATES, TOPICS)
    code = crossed(CODE_TEMPLATES, CODE_TASKS)
    tech = crossed(TECH_TEMPLATES, TECH_TOPICS)
    stories = [f"Write a short story about {c} who {STORY_SITUATIONS[(i + j) % len(STORY_SITUATIONS)]}."
               for j in range(2) for i, c in enumerate(STORY_CHARACTERS)]
    dialogues = []
    for j in range(2):
        for i, (a, b) in enumerate(DIALOGUE_PAIRS):
            who = a if b is None else f"{a} and {b}"
            dialogues.append(f"Write a dialogue between {who} about {DIALOGUE_SUBJECTS[(i + 3 * j) % len(DIALOGUE_SUBJECTS)]}.")
    lists = crossed(LIST_TEMPLATES, LIST_SUBJECTS)
    return [explain, code, tech, stories + dialogues, lists + list(STANDALONE), _math_prompts()]


# share of each kind in any prefix of the set (explanation, code, technical, narrative and
# dialogue, lists and standalone tasks, math); a kind that runs out leaves the rest to the others
KIND_SHARES = (2, 2, 2, 1, 1, 1)


def prompt_set() -> list[str]:
    """Every prompt, the kinds interleaved by ``KIND_SHARES`` (any prefix covers them all)."""
    kinds = _kinds()
    total = sum(len(k) for k in kinds)
    out: list[str] = []
    taken = [0] * len(kinds)
    for _ in range(total):
        # the kind furthest behind its share goes next
        j = min((i for i in range(len(kinds)) if taken[i] < len(kinds[i])),
                key=lambda i: ((taken[i] + 1) / KIND_SHARES[i], i))
        out.append(kinds[j][taken[j]])
        taken[j] += 1
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def article_prompts() -> list[str]:
    """The encyclopedia-article prompts (training only), varying fastest in the subject."""
    return [ARTICLE_TEMPLATES[(i + j) % len(ARTICLE_TEMPLATES)].format(t=t)
            for j in range(len(ARTICLE_TEMPLATES)) for i, t in enumerate(ARTICLE_SUBJECTS)]


_ARTICLES = frozenset(article_prompts())


def is_article(prompt: str) -> bool:
    """Whether the teacher's answer to ``prompt`` is kept as plain prose (an encyclopedia article)."""
    return prompt in _ARTICLES


def split_prompts(train_count: int, eval_count: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out evaluation prompts). Every eighth prompt of the chat kinds is
    held out; the training prompts are the rest with an article as every ``ARTICLE_EVERY``-th."""
    prompts = prompt_set()
    held = [p for i, p in enumerate(prompts) if i % 8 == 7]
    chat = [p for i, p in enumerate(prompts) if i % 8 != 7]
    articles = article_prompts()
    train: list[str] = []
    while chat or articles:
        if articles and (not chat or len(train) % ARTICLE_EVERY == ARTICLE_EVERY - 1):
            train.append(articles.pop(0))
        else:
            train.append(chat.pop(0))
    return train[:train_count], held[:eval_count]
