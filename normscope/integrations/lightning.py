"""PyTorch Lightning callback: watch the LightningModule, step with the trainer, log finding counts.

    from normscope.integrations.lightning import NormscopeCallback
    trainer = lightning.Trainer(callbacks=[NormscopeCallback("runs/exp1", every=20)])

Works with ``lightning`` (``lightning.pytorch``) or the older ``pytorch_lightning`` package.
"""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:
        from normscope.errors import NormscopeError

        raise NormscopeError("the Lightning integration needs lightning: pip install lightning") from e

from normscope.integrations._common import CallbackOptions, as_float, default_run_dir, finish


class NormscopeCallback(CallbackOptions, Callback):
    """Record the run while Lightning trains; at the end, analyse it and log finding counts.

    Steps advance with the optimizer's steps (so with gradient accumulation, one per optimizer
    step, like ``trainer.global_step``). Options are passed to :func:`normscope.watch`.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        from normscope.collect import watch

        opts = trainer.optimizers
        run_dir = self.run_dir or default_run_dir(type(pl_module).__name__)
        self.run_dir = str(run_dir)
        self.scope = watch(pl_module, run_dir, every=self.every, optimizer=opts[0] if opts else None,
                           **self.watch_options).start()  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.scope is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = as_float(loss) if loss is not None else None
        if value is not None:
            self.scope.log(loss=value)

    def on_train_end(self, trainer, pl_module) -> None:
        self.counts = finish(self.scope, self.analyze)
        self.scope = None
        if self.counts is not None and trainer.logger is not None:
            trainer.logger.log_metrics({f"normscope/{k}": v for k, v in self.counts.items()}, step=trainer.global_step)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        finish(self.scope, False, failed=exception)
        self.scope = None
