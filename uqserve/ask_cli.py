"""``uqserve ask BUNDLE QUESTION [--choice TEXT ...]``: ask a running server one question (typed client).

Prints the answer, the probability of each choice, the uncertainty scores and the abstention decision
as a table, or the server's JSON with ``--json``.

Exit status: 0 answered; 3 the server abstained (the distribution is still printed); 2 a client error
(bad arguments, unknown bundle, invalid request, unreachable server, timeout…), its message on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from uqserve.client import DEFAULT_URL, AnswerResponse, Client, UqserveClientError

EXIT_ANSWERED = 0
EXIT_ERROR = 2
EXIT_ABSTAINED = 3
_BAR = 24  # characters of a probability-1 bar
_TEXT = 40  # characters of choice text shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0] if __doc__ else None
    parser.epilog = ("exit status: 0 answered, 3 abstained, 2 client error (message on stderr). "
                     "Example: uqserve ask default 'Which gas do plants take in?' -c oxygen -c 'carbon dioxide'")
    parser.add_argument("bundle", help="name of a bundle loaded on the server")
    parser.add_argument("question", help="the question text")
    parser.add_argument("--choice", "-c", action="append", dest="choices", metavar="TEXT",
                        help="an answer choice, in order (repeat; 2..26); omit for bundles with a fixed label set")
    parser.add_argument("--context", help="passage the question is about")
    parser.add_argument("--url", default=os.environ.get("UQSERVE_URL", DEFAULT_URL),
                        help="server base URL (default: $UQSERVE_URL or %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the server's JSON response")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S", help="client timeout in seconds")


def _score(response: AnswerResponse, name: str) -> float | None:
    values = {"predictive_entropy": response.predictive_entropy, "mutual_information": response.mutual_information,
              "one_minus_max_probability": 1.0 - response.max_probability, "one_minus_feu": response.one_minus_feu}
    return values.get(name)


def _reason(response: AnswerResponse, name: str) -> str:
    value = _score(response, name)
    limit = getattr(response.thresholds_used, name, None)
    if value is None or not isinstance(limit, float | int):
        return name
    return f"{name} {value:.3f} > {limit:.3f}"


def _num(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.3f}{unit}"


def format_answer(response: AnswerResponse, choices: list[str] | None) -> str:
    """The human-readable table ``uqserve ask`` prints."""
    b = response.bundle
    answer = response.answer
    headline = "(abstained)" if answer is None else f"{answer.label}. {answer.text}"
    lines = [f"answer              {headline}",
             f"bundle              {b.name} v{b.version} ({b.method}), request {response.request_id}", ""]
    chosen = answer.index if answer is not None else None
    texts = list(choices or [])
    if not texts and answer is not None:  # a label-set bundle: only the answer's label is known here
        texts = [answer.text if i == answer.index else "" for i in range(len(response.probabilities))]
    best = max(range(len(response.probabilities)), key=response.probabilities.__getitem__)
    width = min(_TEXT, max([len("choice"), *(len(t) for t in texts)]))
    lines.append(f"     {'choice':<{width}}  probability")
    for i, p in enumerate(response.probabilities):
        text = texts[i] if i < len(texts) else ""
        text = text if len(text) <= width else text[:width - 1] + "…"
        mark = ">" if i == chosen else ("*" if chosen is None and i == best else " ")
        lines.append(f"  {mark}{chr(ord('A') + i)} {text:<{width}}  {p:11.3f}  {'█' * round(p * _BAR)}")
    lines += ["",
              f"predictive entropy  {_num(response.predictive_entropy, ' nats')}",
              f"expected entropy    {_num(response.expected_entropy, ' nats')} (aleatoric)",
              f"mutual information  {_num(response.mutual_information, ' nats')} (epistemic)",
              f"max probability     {response.max_probability:.3f}"]
    if response.feu is not None:
        lines.append(f"feu                 {response.feu:.3f}")
    if response.abstained:
        reasons = ", ".join(_reason(response, r) for r in response.abstain_reasons) or "no reason given"
        lines.append(f"abstained           yes: {reasons}")
    else:
        lines.append("abstained           no")
    lines += [f"note                {note}" for note in response.notes or []]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, timeout=args.timeout) as client:
            response = client.answer(args.bundle, args.question, args.choices, context=args.context)
    except UqserveClientError as err:
        print(f"uqserve ask: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(response.model_dump_json(indent=2) if args.json else format_answer(response, args.choices))
    return EXIT_ABSTAINED if response.abstained else EXIT_ANSWERED
