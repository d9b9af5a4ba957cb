"""`python -m app evaluate`: one evaluation over the rounds not yet evaluated (also app/port_detector.py).

Rules, then the CNN-LSTM autoencoder (after warm-up), then a refit on what was judged normal; prints
one summary line. TensorFlow is imported inside run(), only when there are ports to model.

Exit codes: 0 done (anomalies or not); 4 database problem; 6 another evaluation is running.
"""
from __future__ import annotations

import sys

from app.commands.registry import add_command
from app.services.text import json_dumps

DESCRIPTION = """Judge every round recorded since the last evaluation: rule detectors (port scan, SYN
flood, new listener or changed process, traffic to unlistened ports) and, once evaluator.warmup_rounds
rounds exist, the CNN-LSTM autoencoder with its calibrated threshold. Stores an evaluations row and its
anomalies, then refits the model on the windows no detector flagged (a new model version). Then the
sources behind findings are blocked (blocklist), alerts go out, metrics and a report are written."""


def register(sub) -> None:
    parser = add_command(sub, "evaluate", "evaluate the rounds not yet evaluated (rules + model)", DESCRIPTION)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (the evaluation, its findings, block decisions, report)")
    parser.set_defaults(func=run)


def run(args, settings) -> int:
    from app.services import jobs
    if sys.stderr.isatty():      # a person is watching: the model's training can take minutes
        print(f"evaluating the rounds not yet judged in {settings.general.db} (training the model can take a few "
              "minutes)...", file=sys.stderr, flush=True)
    result = jobs.run(settings)
    if args.json:
        print(json_dumps(result.as_dict(), indent=2, default=str))
        return 0
    for line in result.lines():
        print(line, flush=True)
    return 0
