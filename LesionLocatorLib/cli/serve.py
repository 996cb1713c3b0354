"""``lesionlocator serve``: run the inference server (serve.app.serve) for RemoteBackend clients."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, List, Optional, Union

if TYPE_CHECKING:
    from ..serve.config import ServerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lesionlocator serve`` (each default stated once, in its help)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other needs --token or --token-file)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 picks a free one)")
    parser.add_argument("-m", "--model", "--checkpoint", dest="checkpoint", metavar="CHECKPOINT",
                        help="LesionLocatorModel.zip, its extracted folder or one model folder "
                             "(default: the bundled demo model)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--folds", default=None,
                        help="folds to load, and to run for requests that do not choose: 'all' or e.g. '0,1' "
                             "(default: the first fold, as in-process). Requests may choose among the loaded folds")
    parser.add_argument("--tta", action="store_true",
                        help="mirroring TTA for requests that do not say (RemoteBackend always says)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (CUDA only)")
    parser.add_argument("--no-grow", dest="grow", action="store_false",
                        help="predict each lesion in its published patch only, for tracking and for requests that "
                             "do not say (by default a lesion touching an open patch face is followed further)")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--token", help="bearer token clients must send (prefer --token-file: argv is visible to others)")
    tok.add_argument("--token-file", help="file with one token per line (one per client identity)")
    parser.add_argument("--max-sessions", type=int, default=16, help="sessions alive at once (default 16)")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0, help="compressed scan upload cap in MiB "
                                                                            "(default 1024)")
    parser.add_argument("--max-request-mb", type=float, default=64.0,
                        help="cap of any other request body in MiB (default 64)")
    parser.add_argument("--max-cache-mb", type=float, default=None,
                        help="memory for the scans of all sessions in MiB (default: a quarter of physical memory, "
                             "at most 8192)")
    parser.add_argument("--max-queue", type=int, default=64, help="model jobs waiting at once (default 64)")
    # per-client quotas: a client is a token + client key; one client never evicts another's data
    parser.add_argument("--max-sessions-per-client", type=int, default=None,
                        help="sessions one client holds at once (default: a quarter of --max-sessions); a new one "
                             "evicts that client's own oldest")
    parser.add_argument("--max-cache-mb-per-client", type=float, default=None,
                        help="scan memory of one client in MiB (default: a quarter of --max-cache-mb)")
    parser.add_argument("--max-queue-per-client", type=int, default=4,
                        help="model requests one client has waiting (default 4; more get 429); clients are served "
                             "round-robin")
    parser.add_argument("--max-work", type=int, default=256,
                        help="work one request may ask for, in tile passes = sliding-window tiles over each "
                             "lesion's prompt x folds x TTA mirrors (default 256; more get 413 too_much_work); "
                             "passes run by growth count too: a request past it stops before its next tile")
    parser.add_argument("--max-mask-voxels", type=int, default=2**27,
                        help="foreground voxels of all mask prompts of one request (default 134217728; more: 413)")
    parser.add_argument("--request-deadline", type=float, default=300.0,
                        help="seconds a model request may wait and run before it is dropped (checked before "
                             "every tile) (default 300)")
    parser.add_argument("--upload-slots", type=int, default=2,
                        help="uploads decoded at once, at most one per client (default 2)")
    parser.add_argument("--upload-slot-timeout", type=float, default=10.0,
                        help="seconds an upload waits for a free slot before 503 uploads_busy (default 10)")
    parser.add_argument("--upload-min-rate-kbps", type=float, default=64.0,
                        help="minimum average upload rate in KiB/s after --upload-rate-grace seconds (default 64; "
                             "slower: 408 upload_too_slow)")
    parser.add_argument("--upload-rate-grace", type=float, default=30.0,
                        help="seconds before the minimum upload rate applies (default 30)")
    parser.add_argument("--limit-concurrency", type=int, default=64,
                        help="open connections at once (default 64; more get 503)")
    parser.add_argument("--header-timeout", type=float, default=30.0,
                        help="seconds a request's headers may take to arrive; slower connections are closed "
                             "(default 30)")
    parser.add_argument("--shutdown-timeout", type=float, default=20.0,
                        help="seconds SIGTERM waits for requests in flight before closing (default 20)")
    parser.add_argument("--session-ttl", type=float, default=3600.0,
                        help="idle seconds before a session expires (default 3600)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (tokens otherwise travel in clear text)")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up inference at start")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="(default info)")


def parse_folds(text: Optional[str]) -> Union[None, str, List[int]]:
    from ..model.checkpoint import parse_folds as parse

    return None if text is None else parse(text)


def config_from_args(args: argparse.Namespace) -> "ServerConfig":
    from ..serve.auth import read_token_file
    from ..serve.config import ServerConfig

    tokens = (args.token,) if args.token else read_token_file(args.token_file) if args.token_file else ()
    return ServerConfig(
        checkpoint=args.checkpoint, device=args.device, folds=parse_folds(args.folds), tta=args.tta,
        compile=args.compile, grow=args.grow, host=args.host, port=args.port, tokens=tokens,
        max_sessions=args.max_sessions,
        max_upload_mb=args.max_upload_mb, max_request_mb=args.max_request_mb,
        max_cache_mb=args.max_cache_mb, max_sessions_per_client=args.max_sessions_per_client,
        max_cache_mb_per_client=args.max_cache_mb_per_client, max_queue_per_client=args.max_queue_per_client,
        max_work=args.max_work, request_deadline_s=args.request_deadline, upload_slots=args.upload_slots,
        upload_min_rate_kbps=args.upload_min_rate_kbps, limit_concurrency=args.limit_concurrency,
        max_mask_voxels=args.max_mask_voxels, upload_slot_timeout_s=args.upload_slot_timeout,
        shutdown_timeout_s=args.shutdown_timeout, upload_rate_grace_s=args.upload_rate_grace,
        header_timeout_s=args.header_timeout,
        max_queue=args.max_queue, session_ttl_s=args.session_ttl, warmup=not args.no_warmup,
        tls_cert=args.tls_cert, tls_key=args.tls_key)


def run(args: argparse.Namespace) -> int:
    """``lesionlocator serve``: returns a process exit code (2: bad options, before any port is bound)."""
    from ..serve.app import serve

    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(level)  # --log-level wins over a level the caller's logging set up before
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"lesionlocator serve: {exc}", file=sys.stderr)
        return 2
    if not cfg.checkpoint:
        logging.getLogger("lesionlocator.server").warning(
            "no -m given: serving the bundled DEMO model; for clinical-quality results pass the published "
            "LesionLocatorModel.zip with -m")
    return serve(cfg, log_level=args.log_level)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lesionlocator serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
