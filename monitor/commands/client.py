"""``cxr-monitor client score|replay|info|outcome``: call a running sidecar.

grpc is imported inside the command functions only, so other subcommands never load it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ..defaults import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL
from .output import add_command, expand_paths, no_images_message, print_json, untrusted_note
from .remote import add_connection_options, connect

__all__ = ["register"]


def _rpc_error(exc: Any, what: str = "") -> str:
    prefix = f"{what}: " if what else ""
    return f"{prefix}{exc.code().name}: {exc.details()}"


def _print_response(path: str, r: Any) -> None:
    lo, hi = r.failure_interval.lower, r.failure_interval.upper
    marks = (("NOVEL", r.is_novel), ("OUT-OF-SCOPE", r.out_of_scope), ("BLIND-SPOT", r.in_blind_spot))
    flags = " ".join(f for f, on in marks if on)
    t = r.timings
    print(
        f"{path}: cluster {r.cluster}  reliability {r.reliability:.3f}{untrusted_note(r)}  "
        f"failure p {r.failure_probability:.3f} [{lo:.3f}, {hi:.3f}]  novelty {r.novelty:.2f} {flags}".rstrip()
    )
    for reason in r.scope_reasons:
        print(f"    out of scope: {reason}")
    if r.image.HasField("colour_conversion"):
        print(
            f"    colour converted to luminance: {r.image.colour_conversion} "
            f"({r.image.coloured_share:.1%} coloured pixels)"
        )
    top = ", ".join(f"{f.name} {f.z:+.1f}σ" for f in r.top_features)
    print(f"    most deviating: {top}")
    print(
        f"    request {r.request_id}  method {r.method}  model {r.model_id}  server {t.total_seconds * 1e3:.1f} ms "
        f"(decode {t.decode_seconds * 1e3:.1f}, profile {t.profile_seconds * 1e3:.1f}, score {t.score_seconds * 1e3:.1f})"
    )


def _cmd_client_score(args: argparse.Namespace) -> int:
    import grpc

    from ..client import file_request, to_dict

    paths = expand_paths(args.paths)
    if not paths:
        print(f"error: {no_images_message(args.paths)}", file=sys.stderr)
        return EXIT_ERROR
    failed = 0
    with connect(args) as client:
        for path in paths:
            try:
                request = file_request(path, format=args.format, classifier_score=args.score,
                                       request_id=args.request_id if len(paths) == 1 else None)  # fmt: skip
            except OSError as exc:
                print(f"error: {path}: cannot read ({exc.strerror or exc})", file=sys.stderr)
                failed += 1
                continue
            try:
                response = client.score(request)
            except grpc.RpcError as exc:
                print(f"error: {_rpc_error(exc, str(path))}", file=sys.stderr)
                failed += 1
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
                    return EXIT_ERROR  # nothing else will get through
                continue
            if args.json:
                print_json({"path": str(path), **to_dict(response)})
            else:
                _print_response(str(path), response)
    if failed == 0:
        return EXIT_OK
    return EXIT_ERROR if failed == len(paths) else EXIT_PARTIAL


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _cmd_client_replay(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from ..client import file_request

    paths = expand_paths([args.folder])
    if args.limit is not None:
        paths = paths[: args.limit]
    if not paths:
        print(f"error: {no_images_message([args.folder])}", file=sys.stderr)
        return EXIT_ERROR
    if args.concurrency < 1:
        print(f"error: --concurrency must be >= 1, got {args.concurrency}", file=sys.stderr)
        return EXIT_ERROR
    slots = threading.Semaphore(args.concurrency)
    sent: dict[str, float] = {}
    read_errors: list[str] = []

    def requests() -> Iterator[Any]:
        for i, path in enumerate(paths):
            slots.acquire()
            rid = f"{i}:{path.name[:200]}"  # request ids are limited to 256 characters
            try:
                request = file_request(path, request_id=rid)
            except OSError as exc:
                read_errors.append(f"{path}: cannot read ({exc.strerror or exc})")
                slots.release()
                continue
            sent[rid] = time.perf_counter()
            yield request

    latencies: list[float] = []
    clusters: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    novel = blind = untrusted = out_of_scope = 0
    start = time.perf_counter()
    bar = tqdm(total=len(paths), desc="replay", unit="img", disable=True if args.no_progress else None)
    with connect(args) as client:
        try:
            for r in client.score_stream(requests()):
                now = time.perf_counter()
                slots.release()
                bar.update(1)
                latencies.append(now - sent.pop(r.request_id, now))
                if r.HasField("error"):
                    errors[r.error.code_name] += 1
                    bar.write(
                        f"error: {r.request_id}: {r.error.code_name}: {r.error.message}", file=sys.stderr
                    )
                    continue
                clusters[r.cluster] += 1
                novel += r.is_novel
                untrusted += not r.trusted
                out_of_scope += r.out_of_scope
                blind += r.in_blind_spot
        except grpc.RpcError as exc:
            bar.close()
            print(f"error: {_rpc_error(exc)}", file=sys.stderr)
            return EXIT_ERROR
    bar.close()
    for message in read_errors:
        print(f"error: {message}", file=sys.stderr)
    wall = time.perf_counter() - start
    n_ok = sum(clusters.values())
    summary = {
        "count": len(latencies) + len(read_errors),
        "scored": n_ok,
        "errors": sum(errors.values()) + len(read_errors),
        "error_codes": dict(errors),
        "concurrency": args.concurrency,
        "seconds": wall,
        "throughput_per_second": len(latencies) / wall if wall > 0 else float("nan"),
        "latency_p50_seconds": _percentile(latencies, 50),
        "latency_p99_seconds": _percentile(latencies, 99),
        "clusters": {str(k): v for k, v in sorted(clusters.items())},
        "novel": novel,
        "out_of_scope": out_of_scope,
        "untrusted": untrusted,
        "blind_spot": blind,
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"{summary['count']} images in {wall:.1f} s ({summary['throughput_per_second']:.1f}/s, concurrency "
            f"{args.concurrency}): {n_ok} scored, {summary['errors']} errors"
            + (f" {dict(errors)}" if errors else "")
        )
        print(
            f"latency p50 {summary['latency_p50_seconds'] * 1e3:.1f} ms, "
            f"p99 {summary['latency_p99_seconds'] * 1e3:.1f} ms"
        )
        print("clusters: " + ", ".join(f"{k}: {v}" for k, v in summary["clusters"].items()))
        print(f"novel {novel}, out of scope {out_of_scope}, not trusted {untrusted}, in a blind spot {blind}")
    return EXIT_OK if summary["errors"] == 0 else EXIT_PARTIAL


def _cmd_client_info(args: argparse.Namespace) -> int:
    import grpc

    from ..client import to_dict

    with connect(args) as client:
        try:
            info = client.model_info()
        except grpc.RpcError as exc:
            print(f"error: {_rpc_error(exc)}", file=sys.stderr)
            return EXIT_ERROR
    if args.json:
        d = to_dict(info)
        d["card"] = json.loads(d.pop("card_json") or "{}")
        print_json(d)
        return EXIT_OK
    print(f"model {info.model_id}, spectral profile spec {info.spec_version}, server {info.server_version}")
    if info.task:
        print(f"task: {info.task}")
    print(f"{len(info.clusters)} clusters; global failure rate {info.global_failure_rate:.3f}")
    print(f"{'cluster':>7} {'images':>6} {'rate':>6} {'95% interval':>15} {'share':>6} {'reported':>8} "
          f"{'failed':>6}  blind spot")  # fmt: skip
    for c in info.clusters:
        print(
            f"{c.cluster:>7} {c.n_images:>6} {c.rate:>6.3f} [{c.interval.lower:.3f}, {c.interval.upper:.3f}] "
            f"{c.reference_share:>6.3f} {c.outcomes_reported:>8} {c.failures_reported:>6}  "
            f"{'YES' if c.blind_spot else ''}"
        )
    return EXIT_OK


def _cmd_client_outcome(args: argparse.Namespace) -> int:
    import grpc

    from ..client import to_dict

    kwargs: dict[str, Any] = {}
    if args.failure is not None:
        kwargs["failure"] = args.failure
    else:
        kwargs["label"] = args.label
        kwargs["score"] = args.score
    with connect(args) as client:
        try:
            r = client.report_outcome(args.request_id, **kwargs)
        except grpc.RpcError as exc:
            print(f"error: {_rpc_error(exc)}", file=sys.stderr)
            return EXIT_ERROR
    if args.json:
        print_json(to_dict(r))
    else:
        print(
            f"request {r.request_id}: {'failure' if r.failure else 'success'} in cluster {r.cluster} "
            f"(predicted failure p {r.failure_probability:.3f}); cluster so far: "
            f"{r.cluster_failures} failures of {r.cluster_outcomes} outcomes"
        )
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``client`` and its actions to the ``cxr-monitor`` subparsers."""
    p = add_command(
        sub,
        "client",
        "call a running sidecar: score, replay, info, outcome",
        """
        Talk to a running `cxr-monitor serve`. On a failed call the gRPC status code
        name and the server's message are printed on stderr, e.g.
        "error: scan.png: INVALID_ARGUMENT: request ...: not a readable image (...)",
        and the exit status is 3 (1 when only some images failed).
        """,
    )
    csub = p.add_subparsers(dest="client_command", metavar="ACTION", required=True)

    c = add_command(
        csub,
        "score",
        "score image files through the sidecar",
        """
        Send each image (DICOM, PNG, JPEG, WebP, TIFF; folders are expanded) in its
        own Score call and print the reliability, cluster, novelty and server timings.
        """,
        "example:\n  cxr-monitor client score --address localhost:50051 chest.dcm --score 0.83 --json",
    )
    add_connection_options(c)
    c.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    c.add_argument("--score", type=float, default=None, help="the classifier's probability for the image(s)")
    c.add_argument("--format", default=None, choices=("dicom", "png", "jpeg", "webp", "tiff"),
                   help="declare the format instead of letting the server sniff it")  # fmt: skip
    c.add_argument("--request-id", default=None, help="request id (single image only; default: server-made)")
    c.add_argument("--json", action="store_true", help="one JSON object per image")
    c.set_defaults(func=_cmd_client_score)

    c = add_command(
        csub,
        "replay",
        "stream a folder of images through the sidecar and summarise",
        """
        Send every image of DIR (recursive, sorted) over one ScoreStream with at most
        --concurrency images in flight, then print: count, errors, latency p50/p99
        (send to reply, seen by the client), throughput and cluster counts.
        Request ids are "<index>:<file name>".
        """,
        "example:\n  cxr-monitor client replay --address localhost:50051 data/nih/images --concurrency 8 --limit 200",
    )
    add_connection_options(c)
    c.add_argument("folder", metavar="DIR", help="folder of images")
    c.add_argument("--concurrency", type=int, default=4, help="images in flight (default: 4)")
    c.add_argument("--limit", type=int, default=None, help="send only the first N images")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    c.set_defaults(func=_cmd_client_replay)

    c = add_command(
        csub,
        "info",
        "print the served model card",
        "GetModelInfo: clusters, failure rates, reported outcomes.",
    )
    add_connection_options(c)
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_cmd_client_info)

    c = add_command(
        csub,
        "outcome",
        "report the ground truth for an earlier request",
        """
        ReportOutcome: whether the classifier was wrong on the image of REQUEST_ID
        (--failure / --success), or its label with the classifier's score (compared
        with the model's decision threshold; without --score the score sent with the
        image is used).
        """,
        "example:\n  cxr-monitor client outcome 3f2a... --label 1 --score 0.12",
    )
    add_connection_options(c)
    c.add_argument("request_id", metavar="REQUEST_ID")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--failure", dest="failure", action="store_const", const=True, default=None,
                   help="the classifier was wrong")  # fmt: skip
    g.add_argument(
        "--success", dest="failure", action="store_const", const=False, help="the classifier was right"
    )
    g.add_argument("--label", type=int, choices=(0, 1), default=None, help="the true label")
    c.add_argument("--score", type=float, default=None, help="with --label: the classifier's probability")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_cmd_client_outcome)
