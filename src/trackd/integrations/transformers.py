"""trackd as a Hugging Face transformers `TrainerCallback`.

    trainer = Trainer(model, args, train_dataset=data, callbacks=[TrackdCallback(project="p")])
    trainer.train()

On train begin the run starts with the TrainingArguments and the model config as
its config; every `on_log` becomes a row at `state.global_step`, with keys named
as the W&B, TensorBoard and Trackio callbacks name them (`loss` -> `train/loss`,
`eval_loss` -> `eval/loss`); on train end the run finishes. The world's process
zero only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trackd.integrations._common import RunHandle, plain, split_metrics

__all__ = ["TrackdCallback"]

# Logged once at the end of training: they go to the summary, as WandbCallback does.
SINGLE_VALUE_SCALARS = frozenset(
    {
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "train_loss",
        "total_flos",
    }
)


class TrackdCallback(TrainerCallback):
    """`TrackdCallback(project=None, run_name=None, **init_kwargs)`.

    `init_kwargs` go to `trackd.init`; `project` defaults to `TrainingArguments.project`
    (else "huggingface") and `run_name` to `TrainingArguments.run_name`.
    """

    def __init__(
        self, project: str | None = None, run_name: str | None = None, **init_kwargs: Any
    ) -> None:
        self.project = project
        self.run_name = run_name
        self.init_kwargs = init_kwargs
        self.handle: RunHandle | None = None

    def _setup(self, args: TrainingArguments, model: Any) -> RunHandle:
        if self.handle is None:
            project = self.project or getattr(args, "project", None) or "huggingface"
            self.handle = RunHandle(project, self.run_name or args.run_name, self.init_kwargs)
        config: dict[str, Any] = {}
        model_config = getattr(model, "config", None)
        if isinstance(model_config, dict):
            config.update(model_config)
        elif model_config is not None:
            config.update(model_config.to_dict())
        config.update(args.to_dict())  # type: ignore[no-untyped-call]  # unannotated in transformers
        num_parameters = getattr(model, "num_parameters", None)
        if callable(num_parameters):
            config["model/num_parameters"] = num_parameters()
        self.handle.live().log_config(plain(config))
        return self.handle

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero:
            self._setup(args, model)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and logs:
            self._log(args, state, model, logs)

    def on_predict(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any],
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and metrics:
            self._log(args, state, kwargs.get("model"), metrics)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and self.handle is not None:
            self.handle.end()

    def _log(
        self, args: TrainingArguments, state: TrainerState, model: Any, logs: Mapping[str, Any]
    ) -> None:
        handle = self.handle if self.handle is not None else self._setup(args, model)
        final = {key: value for key, value in logs.items() if key in SINGLE_VALUE_SCALARS}
        metrics, text = split_metrics(
            rewrite_logs({k: v for k, v in logs.items() if k not in SINGLE_VALUE_SCALARS})
        )
        run = handle.live()
        if metrics:
            run.log(metrics, step=state.global_step)
        if text or final:
            run.set_summary({**text, **plain(final)})


def rewrite_logs(logs: Mapping[str, Any]) -> dict[str, Any]:
    """`eval_loss` -> `eval/loss`, `test_x` -> `test/x`, anything else `train/...`."""
    rewritten = {}
    for key, value in logs.items():
        section, _, rest = key.partition("_")
        if section in ("eval", "test") and rest:
            rewritten[f"{section}/{rest}"] = value
        else:
            rewritten[f"train/{key}"] = value
    return rewritten
