"""Upload memory benchmark (run by scripts/bench_upload.sh, which starts a controller).

Sends N uploads of S MB at once, each generated while it is sent, and samples the controller's
resident memory (/proc/PID/status) throughout. Reports the controller's peak RSS growth against
the bytes in flight, and the throughput. Prints a report and writes it as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "service"))
from lathe_service import peak_rss_bytes, stream_upload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--controller-pid", type=int, required=True)
    parser.add_argument("--row-file", type=Path, required=True, help="a JSONL file whose first line is repeated")
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--megabytes", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    row = args.row_file.read_text().splitlines()[0].encode() + b"\n"
    rss_before, _ = peak_rss_bytes(args.controller_pid)
    peak = [rss_before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], peak_rss_bytes(args.controller_pid)[0])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    size = args.megabytes << 20
    with ThreadPoolExecutor(max_workers=args.uploads) as pool:
        results = list(pool.map(lambda i: stream_upload(args.http_port, args.api_key, f"bench-{i}.jsonl", row, size, timeout=3600),
                                range(args.uploads)))
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()
    statuses = [status for status, _ in results]
    if statuses != [200] * args.uploads:
        sys.exit(f"uploads failed: {[body[:200] for _, body in results]}")
    total = args.uploads * size
    report = {
        "uploads": args.uploads, "megabytes_each": args.megabytes,
        "controller_rss_before_mb": round(rss_before / 2**20, 1),
        "controller_rss_peak_mb": round(peak[0] / 2**20, 1),
        "growth_mb": round((peak[0] - rss_before) / 2**20, 1),
        "growth_per_byte_uploaded": round((peak[0] - rss_before) / total, 4),
        "seconds": round(elapsed, 1), "mb_per_second": round(total / 2**20 / elapsed, 1),
    }
    print(f"{args.uploads} concurrent uploads of {args.megabytes} MB: controller RSS {report['controller_rss_before_mb']} MB -> "
          f"peak {report['controller_rss_peak_mb']} MB (growth {report['growth_mb']} MB = "
          f"{report['growth_per_byte_uploaded']:.4f} x the bytes uploaded); {report['mb_per_second']} MB/s in {report['seconds']} s")
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
