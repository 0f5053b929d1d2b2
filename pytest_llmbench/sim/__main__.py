"""``python -m pytest_llmbench.sim``: run the simulator in the foreground.

Prints exactly one line, ``pytest-llmbench simulator listening on http://HOST:PORT/v1``,
then serves until SIGINT or SIGTERM. ``--config FILE`` (JSON of :class:`SimConfig` fields)
is read first; flags override it. Bad input is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import FAULT_KINDS, LatencyConfig, SimConfig
from .server import start_site
from .state import SimState

BANNER = "pytest-llmbench simulator listening on {url}"


def _latency(text: str) -> LatencyConfig:
    try:
        return LatencyConfig.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).splitlines()[0]) from None


def _fault_rate(text: str) -> tuple[str, float]:
    kind, sep, value = text.partition("=")
    if not sep or kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(
            f"expected KIND=P with KIND one of {', '.join(FAULT_KINDS)}, got {text!r}"
        )
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a probability: {value!r}") from None
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"not a probability: {value!r}")
    return kind, p


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pytest_llmbench.sim",
        description="OpenAI-compatible simulator (chat completions, files, batches).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default)")
    p.add_argument("--config", type=Path, metavar="JSON_FILE", help="SimConfig fields as JSON")
    p.add_argument("--rpm", type=_positive(int), help="requests per minute per model")
    p.add_argument("--tpm", type=_positive(int), help="tokens per minute per model")
    p.add_argument("--burst-seconds", type=_positive(float), help="bucket capacity in seconds")
    p.add_argument("--default-max-tokens", type=_positive(int), help="TPM estimate w/o max_tokens")
    p.add_argument(
        "--latency", type=_latency, help="none | fixed:S | uniform:LO:HI | lognormal:MEAN:SIGMA"
    )
    p.add_argument(
        "--parallelism",
        type=_positive(int),
        help="chat requests answered at once at most; the rest queue (like llama.cpp)",
    )
    p.add_argument("--answer-key", metavar="PATH", help="answer key (JSON list or JSONL)")
    p.add_argument(
        "--tokenizer",
        choices=("exact", "estimate"),
        help="prompt tokens: exact (needs pytest-llmbench[tokens]; its default) or chars/4",
    )
    p.add_argument(
        "--quota-exceeded",
        action="store_true",
        default=None,
        help="answer every chat call with 429 insufficient_quota",
    )
    p.add_argument(
        "--fault-rate",
        type=_fault_rate,
        action="append",
        metavar="KIND=P",
        help=f"fault probability; KIND in {', '.join(FAULT_KINDS)} (repeatable)",
    )
    p.add_argument("--script", metavar="K1,K2,...", help="faults for the next requests (ok = none)")
    p.add_argument("--hang-seconds", type=_positive(float))
    p.add_argument("--seed", type=int)
    p.add_argument("--p-correct", type=float, help="p(correct) at temperature 0")
    p.add_argument("--temperature-slope", type=float, help="p(correct) lost per unit of T")
    p.add_argument("--models", metavar="M1,M2,...", help="models served")
    p.add_argument("--accept-any-model", action="store_true", default=None)
    p.add_argument(
        "--no-api-key",
        dest="require_api_key",
        action="store_false",
        default=None,
        help="accept requests without an API key",
    )
    p.add_argument("--batch-validating-seconds", type=float)
    p.add_argument("--batch-requests-per-second", type=_positive(float))
    p.add_argument("--batch-finalizing-seconds", type=float)
    p.add_argument("--batch-expire-after", type=_positive(float))
    p.add_argument("--batch-max-requests", type=_positive(int))
    p.add_argument("--batch-enqueued-token-limit", type=_positive(int))
    p.add_argument("--batch-line-error-rate", type=float)
    p.add_argument(
        "--gateway",
        action="store_true",
        default=None,
        help="429s as a LiteLLM proxy rewrites them (throttling_error, llm_provider-* headers)",
    )
    p.add_argument(
        "--no-rate-limit-headers",
        dest="rate_limit_headers",
        action="store_false",
        default=None,
        help="send no x-ratelimit-* headers (like llama.cpp's server)",
    )
    p.add_argument(
        "--no-batch-api",
        dest="batch_api",
        action="store_false",
        default=None,
        help="answer /v1/files and /v1/batches with 404 (no Files or Batch API)",
    )
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SimConfig:
    """The SimConfig of ``--config`` and the flags (flags win); exits 2 on bad input."""
    data: dict[str, Any] = {}
    if args.config is not None:
        try:
            data = json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"--config {args.config}: {exc}")
        if not isinstance(data, dict):
            parser.error(f"--config {args.config}: expected a JSON object")
    direct = [
        "rpm",
        "tpm",
        "burst_seconds",
        "default_max_tokens",
        "latency",
        "parallelism",
        "quota_exceeded",
        "hang_seconds",
        "seed",
        "p_correct",
        "temperature_slope",
        "accept_any_model",
        "require_api_key",
        "batch_validating_seconds",
        "batch_requests_per_second",
        "batch_finalizing_seconds",
        "batch_expire_after",
        "batch_max_requests",
        "batch_enqueued_token_limit",
        "batch_line_error_rate",
        "gateway",
        "rate_limit_headers",
        "batch_api",
    ]
    for name in direct:
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.answer_key is not None:
        data["answer_key_path"] = args.answer_key
    if args.fault_rate:
        data["faults"] = {**data.get("faults", {}), **dict(args.fault_rate)}
    if args.script is not None:
        data["script"] = [s.strip() for s in args.script.split(",") if s.strip()]
    if args.models is not None:
        data["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        config = SimConfig.model_validate(data)
        SimState(config)  # loads the answer key now, so a bad file fails here
    except ValidationError as exc:
        err = exc.errors()[0]
        parser.error(f"invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}")
    except (OSError, ValueError) as exc:
        parser.error(str(exc).splitlines()[0])
    return config


async def serve(config: SimConfig, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, printing the banner line once bound."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C raises instead
            loop.add_signal_handler(sig, stop.set)
    runner, bound = await start_site(SimState(config), host, port)
    shown = f"[{host}]" if ":" in host else host
    print(BANNER.format(url=f"http://{shown}:{bound}/v1"), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    try:
        asyncio.run(serve(config, args.host, args.port))
    except OSError as exc:
        print(
            f"pytest-llmbench simulator: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
