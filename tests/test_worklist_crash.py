"""A seeded crash test of the worklist (issue 25): a process autosaving and drafting in a loop is
killed with SIGKILL at random moments, again and again; after every kill the worklist opens with
the last acknowledged edits (never fewer), a draft that loads, a readable state, and no temporary
file left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_kidseg.cascade import Cascade
from napari_kidseg.io import volumes
from napari_kidseg.phantoms.procedural import make_phantom
from napari_kidseg.worklist import STATE_FOLDER, Worklist

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from napari_kidseg.cascade import CascadeResult
    from napari_kidseg.worklist import Worklist

    folder, template, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    result, _ = CascadeResult.load_probabilities(template)

    class Drafter:  # the cascade's result, without loading a network in every process
        coarse_path, refine_path = Path("m/coarse.safetensors"), Path("m/refine.safetensors")

        def run(self, *args, **kwargs):
            return result

    wl = Worklist(folder)
    assert not wl.read_only, wl.notes
    row = wl.rows[0]
    ct = wl.read_ct(row)
    labels = result.fuse()
    print("ready", flush=True)
    while True:
        n += 1
        wl.save_edits(row, labels, {n}, seconds=float(n))
        print("edits", n, flush=True)
        if n % 2 == 0:
            wl.draft(row, Drafter(), ct=ct)
            print("draft", n, flush=True)
    """
)


def _leftovers(state_dir: Path) -> list[Path]:
    return [p for sub in ("", "drafts", "edits") for p in (state_dir / sub).glob(".*.tmp*")]


@pytest.mark.parametrize(
    "kills", [pytest.param(6, id="6 kills"), pytest.param(50, id="50 kills", marks=pytest.mark.slow)]
)
def test_kill_9_during_autosave_and_drafting_loses_nothing_and_leaves_nothing(tmp_path, tiny_checkpoints, kills):
    folder = tmp_path / "cases"
    folder.mkdir()
    case = make_phantom(70, matrix=96, max_slices=24, n_tumors=1)
    volumes.write_volume(folder / "a.nii.gz", case.ct.array, case.ct)
    ct = volumes.read_ct(folder / "a.nii.gz")
    template = tmp_path / "result.npz"
    Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu").run(
        ct.array, ct.geometry.spacing
    ).save_probabilities(template)
    rng = random.Random(25)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    acked_edits, acked_draft, mid_write = 0, False, 0
    for kill in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(folder), str(template), str(acked_edits)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        try:
            child.wait(timeout=rng.uniform(0.02, 0.6))
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()  # reaped: its pid is gone, so its lock is a dead process's
        assert child.returncode == -signal.SIGKILL, child.stderr.read()
        for line in child.stdout.read().splitlines():
            what, n = line.split()
            if what == "edits":
                acked_edits = max(acked_edits, int(n))
            elif what == "draft":
                acked_draft = True
        state_dir = folder / STATE_FOLDER
        mid_write += bool(_leftovers(state_dir))  # killed inside a write: the next open cleans up
        wl = Worklist(folder)
        try:
            assert not wl.read_only, wl.notes
            assert not [n for n in wl.notes if "taken over" not in n], wl.notes  # a readable state
            row = wl.rows[0]
            wl.read_ct(row)
            edits = wl.load_edits(row)
            if acked_edits:
                assert edits is not None, f"kill {kill}: the edits are lost"
                assert max(edits[1]) >= acked_edits, f"kill {kill}: edits {max(edits[1])} < acknowledged {acked_edits}"
                acked_edits = max(edits[1])
                assert row.status == "in review"
            draft = wl.load_draft(row)
            if acked_draft:
                assert draft is not None, f"kill {kill}: the draft is lost"
            assert not _leftovers(state_dir), f"kill {kill}: left behind {_leftovers(state_dir)}"
        finally:
            wl.close()
    assert acked_edits > kills  # the kills came while it was working, not before it started
    print(f"{kills} kills ({mid_write} inside a write): last edits {acked_edits} kept, 0 lost, 0 leftovers")
