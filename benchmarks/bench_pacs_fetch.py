"""How fast a series comes from a PACS: a 512 x 512 x N CT series (one real slice of
``../shared/data/realct/dcmqi-liver-3slice`` at N positions 1 mm apart, uncompressed 16 bit, as
a CT's slices travel), uploaded to a local Orthanc (started here like the tests start theirs),
fetched with ``napari_kidseg.pacs.Pacs.fetch`` (WADO-RS, atomic) and read; prints a markdown table.

    python benchmarks/bench_pacs_fetch.py [--slices 300] [--repeats 3]

Needs the Debian packages orthanc and orthanc-dicomweb (``make setup`` installs them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import orthanc_server  # noqa: E402 (the tests' helper, found through the path above)

SLICE = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct" / "dcmqi-liver-3slice" / "01.dcm"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    why = orthanc_server.missing()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    from napari_kidseg import pacs
    from napari_kidseg.io import volumes

    os.environ[pacs.ENV_USER], os.environ[pacs.ENV_PASSWORD] = orthanc_server.USER, orthanc_server.PASSWORD
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ[pacs.ENV_CONFIG] = str(tmp / "none.json")
        series, _, _ = orthanc_server.repeated_series(SLICE, tmp / "series", args.slices)
        print(f"wrote {args.slices} slices", file=sys.stderr, flush=True)
        with orthanc_server.Orthanc(tmp / "orthanc") as server:
            server.upload(sorted(series.glob("*.dcm")))
            print("uploaded", file=sys.stderr, flush=True)
            client = pacs.Pacs(server.url)
            (info,) = client.find()
            rows = []
            for k in range(args.repeats):
                dest = tmp / f"fetched-{k}"
                t0 = time.perf_counter()
                client.fetch(info.study_uid, info.series_uid, dest, expected=info.slices)
                fetch_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                got = volumes.read_ct(dest)
                read_s = time.perf_counter() - t1
                shape = "x".join(str(v) for v in got.array.shape[::-1])
                mb = client.last_fetch["bytes"] / 1e6
                rows.append((k + 1, info.slices, mb, fetch_s, mb / fetch_s, read_s))
    print(f"series {shape} (x, y, slices), {os.cpu_count()} CPU(s), Orthanc on loopback\n")
    print("| run | instances | MB | fetch s | MB/s | read CT s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.1f} | {r[4]:.0f} | {r[5]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
