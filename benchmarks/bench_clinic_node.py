"""The clinic's DICOM round trip per 30-slice 512x512 study (issue: clinic results as DICOM).

dcmtk's ``storescu`` pushes a generated study to ``hemexp serve`` (a real subprocess, loopback), which
scores it and sends the SEG and SR to dcmtk's ``storescp``. Timed from the first byte sent to both
results stored at the "PACS"; the node waits ``--settle`` seconds of quiet before it calls a series
complete, so that wait is part of the figure and is printed apart. Weights are random (the time
does not depend on them). Needs ``apt-get install -y dcmtk``.

Run: ``python -m benchmarks.bench_clinic_node [--preset small] [--studies 3] [--settle 2]``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.checkpoint import save_checkpoint
from common.config import PreprocessConfig
from common.model import build_joint_model
from common.presets import get_preset
from tests.helpers.data import head_phantom, write_series
from tests.helpers.dicom_net import LOOPBACK, free_port, listening, need, stop, storescu, wait_for

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--slices", type=int, default=30)
    ap.add_argument("--settle", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = get_preset(args.preset)
        ckpt = save_checkpoint(
            root / "ckpt.pt", build_joint_model(cfg, seed=0), cfg, PreprocessConfig(size=cfg.image_size)
        )
        studies = []
        for i in range(args.studies):
            hu = head_phantom((args.slices, 512, 512), seed=i)
            hu[:3] = -1000.0  # above the vertex
            studies.append(write_series(root / f"study{i}", hu, spacing=(5.0, 0.45, 0.45), seed=i)[0].parent)
        pacs_port, node_port, pacs = free_port(), free_port(), root / "pacs"
        pacs.mkdir()
        scp = subprocess.Popen(
            [need("storescp"), "-aet", "PACS", "-od", str(pacs), str(pacs_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        log = (root / "serve.log").open("w")
        node = subprocess.Popen(
            [sys.executable, "-m", "client.inference.cli", "serve", "--model", str(ckpt)]
            + ["--dest", f"PACS@{LOOPBACK}:{pacs_port}", "--host", LOOPBACK, "--port", str(node_port)]
            + ["--settle", str(args.settle), "--audit-log", str(root / "audit.log"), "--key-dir", str(root / "key")]
            + ["--spool", str(root / "spool")]  # not the persistent default under the home folder
            + ["--device", "cpu"],
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
        try:
            wait_for(lambda: listening(pacs_port) and "listening as" in (root / "serve.log").read_text(), 300, "node")
            print(
                f"{args.slices}-slice 512x512 study, preset {args.preset} ({cfg.image_size} px), settle {args.settle} s"
            )
            for i, study in enumerate(studies):
                t0 = time.perf_counter()
                pushed = storescu(node_port, study, calling="BENCH")
                t_push = time.perf_counter() - t0
                assert pushed.returncode == 0, pushed.stdout + pushed.stderr
                wait_for(lambda n=2 * (i + 1): len(list(pacs.iterdir())) >= n, 600, "SEG and SR")
                total = time.perf_counter() - t0
                line = (root / "audit.log").read_text().splitlines()[-1]
                scored = float(re.search(r"seconds=([\d.]+)", line).group(1))
                print(
                    f"study {i}: {total:6.2f} s round trip (push {t_push:.2f} s, settle {args.settle:.0f} s, "
                    f"score + SEG/SR + send {scored:.2f} s); {line.split('outcome=')[1].split()[0]}"
                )
        finally:
            stop(node)
            stop(scp)
            log.close()


if __name__ == "__main__":
    main()
