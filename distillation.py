"""The seed's entry point: `python distillation.py --hybrid --epochs 20` is `hybridopt distill ...`."""
import sys

from hybridopt.cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
