"""The README as written: every ```python block of README.md (and of docs/*.md) runs, each in a
fresh interpreter whose working directory is outside the source tree (so the installed package
is what runs). The docs' blocks are marked slow.

Substitution rule (the only change made to a block): a snippet may leave the model and the data
to the reader. Each line ``NAME = ...`` (the right side exactly ``...``, a comment allowed) gets
the fixture for NAME as its right side, and the prelude below runs first. The fixtures: ``model``
is ``TinyNet()`` (layers ``fc1``, ``fc2``; 10 features in, 3 classes out), a LightningModule
around it in a block that mentions ``lightning``, a one-layer GPT-2 (vocabulary 64) in a block
that mentions ``transformers``; ``loader`` holds 4 batches ``(x, y)`` of 16 examples;
``dataset`` / ``train_dataset`` the 64 examples behind it, or 16 token sequences (``input_ids``,
``labels``) in a ``transformers`` block. A ``NAME = ...`` line without a fixture fails, naming
it; any other ``...`` is left as Python's Ellipsis. A block that imports a package that is not
installed is skipped, naming it.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PRELUDE = '''\
import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


dataset = torch.utils.data.TensorDataset(torch.randn(64, 10), torch.randint(0, 3, (64,)))
loader = torch.utils.data.DataLoader(dataset, batch_size=16)


def lit_tiny():
    import lightning.pytorch as pl

    class LitTiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyNet()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return LitTiny()


def tiny_gpt2():
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0))


class TokenData(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (16, 8))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
'''

FIXTURES = {
    "model": {"": "TinyNet()", "lightning": "lit_tiny()", "transformers": "tiny_gpt2()"},
    "net": {"": "TinyNet()"},
    "loader": {"": "torch.utils.data.DataLoader(dataset, batch_size=16)"},
    "train_loader": {"": "torch.utils.data.DataLoader(dataset, batch_size=16)"},
    "dataset": {"": "dataset", "transformers": "TokenData()"},
    "train_dataset": {"": "dataset", "transformers": "TokenData()"},
}

_PLACEHOLDER = re.compile(r"^(\s*)([A-Za-z_]\w*)\s*=\s*\.\.\.\s*(#.*)?$")
_IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block whose info string is ``python``."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start + 1, "\n".join(body) + "\n"))
        i += 1
    return blocks


def fixture(name: str, code: str) -> str:
    if name not in FIXTURES:
        raise KeyError(f"placeholder `{name} = ...` has no fixture in test_readme.py")
    options = FIXTURES[name]
    for context in ("transformers", "lightning"):
        if context in options and context in code:
            return options[context]
    return options[""]


def substitute(code: str) -> str:
    out = []
    for line in code.splitlines():
        m = _PLACEHOLDER.match(line)
        if m:
            line = f"{m.group(1)}{m.group(2)} = {fixture(m.group(2), code)}"
        out.append(line)
    return "\n".join(out) + "\n"


BLOCKS = [(f"{doc.relative_to(ROOT)}:{n}", code) for doc in DOCS if doc.exists()
          for n, code in python_blocks(doc.read_text())]
# the docs' blocks start trainers (a fresh interpreter importing Lightning or transformers)
PARAMS = [pytest.param(w, c, id=w, marks=() if w.startswith("README.md:") else pytest.mark.slow)
          for w, c in BLOCKS]


def test_the_readme_has_python_blocks():
    assert any(where.startswith("README.md:") for where, _ in BLOCKS), "no ```python blocks"


def test_substitution_rule():
    code = "model = ...  # any nn.Module\n    loader = ...\nx = f(...)\n"
    assert substitute(code) == ("model = TinyNet()\n    loader = " + FIXTURES["loader"][""]
                                + "\nx = f(...)\n")
    assert substitute("import transformers\nmodel = ...\n").endswith("model = tiny_gpt2()\n")
    with pytest.raises(KeyError, match="unknown_thing"):
        substitute("unknown_thing = ...\n")


@pytest.mark.parametrize("where, code", PARAMS)
def test_readme_block_runs(where: str, code: str, tmp_path: Path):
    missing = sorted({m for m in _IMPORT.findall(code) if importlib.util.find_spec(m) is None})
    if missing:
        pytest.skip(f"{where} imports {', '.join(missing)}, not installed")
    script = tmp_path / "snippet.py"
    script.write_text(PRELUDE + "\n" + substitute(code))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{where} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
