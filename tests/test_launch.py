"""st.launch from pytest, from a script and from a Jupyter notebook cell."""
import subprocess
import sys
import textwrap

import nbformat
import pytest
from nbclient import NotebookClient

import shardtensor as st


def _collect(rank, x):
    import torch.distributed as dist
    t = __import__("torch").tensor([rank + x], dtype=__import__("torch").float32)
    dist.all_reduce(t)
    return rank, dist.get_world_size(), float(t)


def test_launch_from_pytest():
    assert st.launch(_collect, world_size=2, args=(10,)) == [(0, 2, 21.0), (1, 2, 21.0)]


def test_launch_reports_the_failing_rank():
    with pytest.raises(st.launch.__globals__["RemoteError"], match="rank 1 failed"):
        st.launch(_fail_on_one, world_size=2)


def _fail_on_one(rank):
    if rank == 1:
        raise ValueError("boom")
    return rank


def test_launch_from_a_script(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""
        import shardtensor as st
        def f(rank):
            return rank * 10
        if __name__ == "__main__":
            print(st.launch(f, world_size=2))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[0, 10]" in out.stdout


def test_launch_from_a_notebook_cell():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent("""
        import shardtensor as st
        def f(rank, k):
            import torch.distributed as dist
            return (rank + k, dist.get_world_size())
        print(st.launch(f, world_size=2, args=(5,)))
    """))]
    NotebookClient(nb, timeout=180, kernel_name="python3").execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert "[(5, 2), (6, 2)]" in text
