"""The Lightning and Hugging Face Trainer callbacks, each with the real library on a tiny model."""

import os

import pytest
import torch
from torch import nn

from normscope import load


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from normscope.integrations.lightning import NormscopeCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = NormscopeCallback(str(tmp_path / "run"), every=2)
    trainer = L.Trainer(max_steps=6, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(Module(), torch.utils.data.DataLoader(TinyData(), batch_size=8))
    run = load(tmp_path / "run")
    assert run.meta["status"] == "complete"
    assert run.steps == [0, 2, 4]  # steps advance with the trainer's optimizer steps
    assert {"net.0", "net.1", "net.2"} <= set(run.stats.layer)
    assert len(run.scalars) and set(run.scalars.name) == {"loss"}
    assert cb.counts is not None and set(cb.counts) == {"error", "warning", "info"}


def test_transformers_trainer_callback(tmp_path):
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Trainer, TrainingArguments

    from normscope.integrations.transformers import NormscopeCallback

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))

        def forward(self, x=None, labels=None):
            logits = self.body(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class DictData(TinyData):
        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, learning_rate=0.05)  # fmt: skip
    cb = NormscopeCallback(str(tmp_path / "run"), every=3)
    trainer = Trainer(model=Model(), args=args, train_dataset=DictData(), callbacks=[cb])
    trainer.train()
    run = load(tmp_path / "run")
    assert run.meta["status"] == "complete" and run.steps == [0, 3]
    assert {"body.0", "body.1", "body.2"} <= set(run.stats.layer)
    assert len(run.params) and run.params.update_norm.notna().all()
    assert any("normscope/warning" in e for e in trainer.state.log_history)
