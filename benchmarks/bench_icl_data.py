"""How fast `flamingo-vlm data icl-episodes` writes training episodes (one process).

    PYTHONPATH=src python benchmarks/bench_icl_data.py --documents 500 [--workers 4]   # ~40 s on a quiet core

Writes ``--documents`` episodes (1-8 demonstrations each, 224 px JPEG) through
:func:`flamingo_vlm.synthetic.icl.write_icl_shards` into a temporary folder, then prints documents
and images per second, the bytes written, the time 20,000 documents would take at that rate, and
the CPU load of other processes while it ran (the figure is only comparable on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import OthersLoad  # noqa: E402  (the contention probe the other benchmarks print)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=500)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--split", default="train")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    from flamingo_vlm.synthetic.icl import write_icl_shards

    with tempfile.TemporaryDirectory() as tmp:
        load = OthersLoad()
        t0 = time.perf_counter()
        paths = write_icl_shards(Path(tmp) / "shards", split=a.split, n_documents=a.documents, image_size=a.image_size,
                                 workers=a.workers)
        seconds = time.perf_counter() - t0
        others = load.cores()
        size = sum(p.stat().st_size for p in paths)
        images = 0
        import tarfile

        for path in paths:
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        images += len(json.load(tar.extractfile(m))["image_info"])
    result = {"documents": a.documents, "images": images, "seconds": round(seconds, 1),
              "documents_per_s": round(a.documents / seconds, 1), "images_per_s": round(images / seconds, 1),
              "mb": round(size / 2**20, 1), "minutes_for_20000_documents": round(20000 / (a.documents / seconds) / 60, 1),
              "other_processes_cores": round(others, 2), "load_average": os.getloadavg(), "cpus": os.cpu_count(), "workers": a.workers}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
