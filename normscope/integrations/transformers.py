"""Hugging Face ``transformers.Trainer`` callback.

    from normscope.integrations.transformers import NormscopeCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[NormscopeCallback("runs/exp1")])

At the end of training the run is analysed and the finding counts are added to
``trainer.state.log_history`` (and printed on the main process).
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover
    from normscope.errors import NormscopeError

    raise NormscopeError("the transformers integration needs transformers: pip install transformers") from e

from normscope.integrations._common import CallbackOptions, as_float, default_run_dir, finish


class NormscopeCallback(CallbackOptions, TrainerCallback):
    """Watch the model while ``Trainer`` trains; steps advance with the optimizer's steps."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from normscope.collect import watch

        run_dir = self.run_dir or default_run_dir(type(model).__name__)
        self.run_dir = str(run_dir)
        self.scope = watch(model, run_dir, every=self.every, optimizer=optimizer, **self.watch_options).start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.scope is not None and logs and "loss" in logs:
            v = as_float(logs["loss"])
            if v is not None:
                self.scope.log(loss=v)

    def on_train_end(self, args, state, control, **kwargs):
        self.counts = finish(self.scope, self.analyze)
        self.scope = None
        if self.counts is not None:
            entry = {f"normscope/{k}": v for k, v in self.counts.items()}
            state.log_history.append({**entry, "step": state.global_step})
            if state.is_world_process_zero:
                print(f"normscope: {self.counts} -> {self.run_dir}")
