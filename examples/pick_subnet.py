"""Pick a subnet under a device budget from a run's AmoebaLLM table (`compress model --profile edge`).

    python examples/pick_subnet.py RUN --max-ms-per-token 3.0 [--max-size-mb 60] [--out DIR]

Prints the table (measured points, and predicted ones marked *), then extracts the most accurate
subnet that meets every budget; its latency is measured, never only predicted. No subnet within
budget: the closest point is named and the script exits 2, as `compress subnets pick` does.
"""

import argparse
import sys

from compress import api
from compress.errors import UserError
from compress.frontier import table_markdown

ap = argparse.ArgumentParser()
ap.add_argument("run")
ap.add_argument("--max-ms-per-token", type=float, default=0.0)
ap.add_argument("--max-size-mb", type=float, default=0.0)
ap.add_argument("--max-ppl", type=float, default=0.0)
ap.add_argument("--out", default=None)
args = ap.parse_args()

table = api.subnets_list(args.run)
print("\n".join(table_markdown(table["subnets"])))
try:
    got = api.subnets_pick(args.run, args.out, max_ms_per_token=args.max_ms_per_token, max_size_mb=args.max_size_mb,
                           max_ppl=args.max_ppl, force=True, quiet=True)
except UserError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
r = got["row"]
print(f"picked depth {r['depth']} width {r['width']}: {r['ms_per_token']:.2f} ms/token (measured), "
      f"{r['size_mb']:.1f} MB, perplexity {r['perplexity']:.3f} -> {got['out']}")
