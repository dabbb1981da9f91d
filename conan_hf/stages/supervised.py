"""Stage 4 (paper §3.1, §3.4, App. A): supervised multi-task fine-tuning.

    accelerate launch -m conan_hf.stages supervised --config conan_hf/stages/configs/supervised.yaml [--preset tiny]

Tasks and their losses:

- ``retrieval`` and ``clr`` (cross-lingual retrieval, §3.3): (query, positive, hard negatives) with InfoNCE (eq. 1),
  in-batch negatives plus ``num_negatives`` (7) hard negatives per query;
- ``classification``: (text, positive label, negative labels) with InfoNCE against the row's own candidates only;
- ``sts``: (sentence1, sentence2, score) with CoSENT (eq. 2).

Every loss is wrapped in Matryoshka representation learning (App. A). Hard negatives come from a ranked pool per
example; Dynamic Hard Negative Mining (§3.4, eq. 6, :mod:`conan_hf.dhnm.pool`) replaces the ones that became easy. A
replacement is decided after the example's batch and trained at the example's next visit, so stage 4 trains
``num_train_epochs: 2`` by default (App. A gives no epoch count): every replacement made in the first pass is carried
by a batch of the second (``dhnm_used`` in the logs and the summary). InfoNCE masks in-batch false negatives:
documents identical to a query's positive, which the batch sampler cannot exclude when pool negatives are added at
collate time (``infonce_false_negatives_masked``).
The rows of every task and the candidate negatives are written, batch by batch, to memory-mapped Arrow files under
``<output_dir>/stage4_tables/`` (:func:`write_task_table`); the pool holds row ids into them (``candidate_ids.npy``,
also memory-mapped) and the collator looks up the texts of each batch only (:func:`build_negative_pool`). Training
holds no rows or negatives as Python objects; while the tables are written, ``read_sources`` still returns each
task's rows as one Python list (see :func:`_task_rows`), dropped once written.
Each task has its own batch size (paper: 4 for retrieval, 32 for STS) and its own instruction prompt; batches are
drawn from one task at a time, in proportion to the tasks' sizes. ``lora`` trains LoRA adapters instead of all
weights (Table 6's comparison) and merges them into the saved model.

``model`` is the stage-3 output or your own model: a decoder (Llama, Qwen2, Qwen3, Mistral, ...; bidirectional by
default, or ``attention_mode: causal`` with last-token pooling) or an encoder (BERT-like, e.g. all-MiniLM-L6-v2).
The attention in use is printed at the start.

``eval_data`` gives dev sets of the training tasks (``{task name: data sources}``), evaluated every ``eval_steps``
with ``eval_strategy: steps`` (Spearman for STS, nDCG@10 for retrieval / CLR; :mod:`conan_hf.training.evaluation`);
``load_best_model_at_end`` then saves the checkpoint that scored best.

Output: ``final_dir``, the finished SentenceTransformer (prompts per task; MRL dims in ``conan_stage.json`` and the
model card), by default exported with stock transformers classes so that it loads without ``trust_remote_code``
(``export_format``, see :mod:`conan_hf.export`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from conan_hf.dhnm import FalseNegativeCountCallback, MultiTaskScores
from conan_hf.errors import DataError
from conan_hf.prompts import mteb_prompt_names
from conan_hf.sentence import format_query_prompt
from conan_hf.stages.tasks import (  # noqa: F401  (importable from this module too)
    DEFAULT_BATCH_SIZES,
    DEMO_PROMPTS,
    TASK_TYPES,
    TaskConfig,
    TaskTable,
    _demo_tasks,
    _negatives,
    _task_rows,
    _write_table_files,
    build_negative_pool,
    iter_task_examples,
    task_rows,
    write_task_table,
)
from conan_hf.training.config import StageConfig, config_from_dict, option, override
from conan_hf.training.distributed import print_main
from conan_hf.training.lora import add_lora, merge_lora
from conan_hf.training.models import describe_attention, load_sentence_model
from conan_hf.training.multitask import (
    MultiTaskCollator,
    MultiTaskTrainer,
    ProportionalTaskSampler,
    RoundRobinTaskSampler,
)
from conan_hf.training.runner import StageRunner

logger = logging.getLogger(__name__)

STAGE4_ATTENTION_MODES = ("bidirectional", "causal")


def _eq6_default(name: str) -> float:
    """The paper's eq. 6 threshold ``name`` (``s0_min`` 0.4, ``drop_ratio`` 1.2, ``s_max`` 0.7), as defined by
    :func:`conan_hf.dhnm.dhnm_should_replace`."""
    import inspect

    from conan_hf.dhnm import dhnm_should_replace

    return inspect.signature(dhnm_should_replace).parameters[name].default


@dataclasses.dataclass
class SupervisedConfig(StageConfig):
    """Options of stage 4 (the shared ones: :class:`conan_hf.training.config.StageConfig`; App. A: the optimizer
    settings and learning rate of pre-training)."""

    output_dir: str = override(StageConfig, "output_dir", "runs/supervised")
    model: str = option("runs/weak/final", help="the stage-3 output folder (a SentenceTransformer; a stage-2 decoder "
                                                "folder also works), or your own encoder or decoder.")
    tasks: list = option(help="list of :class:`TaskConfig` mappings (``name``, ``type``, ``data``, ``batch_size``, "
                              "``prompt``; sts tasks also ``score_range``, the gold scores' scale, default [0, 5]).",
                         factory=_demo_tasks)
    num_negatives: int = option(7, help="active hard negatives per example (7 in the paper).")
    temperature: float = option(0.05, help="InfoNCE τ (eq. 1).")
    cosent_scale: float = option(20.0, help="CoSENT's scale (1/τ of eq. 2).")
    matryoshka: bool = option(True, help="wrap every loss in Matryoshka representation learning (App. A).")
    matryoshka_dims: list | None = option(None, help="``None`` derives them from the embedding size (the paper's "
                                                     "dims for 3584: 256, 512, 1024, 1536, 2048, 3072, 3584).")
    dhnm: bool = option(True, help="replace hard negatives that became easy (eq. 6 with thresholds ``dhnm_s0_min``, "
                                   "``dhnm_drop_ratio``, ``dhnm_s_max``); ``false`` keeps each example's first "
                                   "``num_negatives`` candidates. A replacement trains when its example is re-queued "
                                   "later in the same epoch (``dhnm_requeue``), else at the example's next visit.")
    dhnm_requeue: bool = option(True, help="re-queue examples holding fresh replacements into later batches of the "
                                           "same epoch, so a replacement trains soon after it is made "
                                           "(:mod:`conan_hf.dhnm.requeue`); ``false``: only at the next visit.")
    dhnm_requeue_rows: int | None = option(None, help="re-queued rows per batch at most (``None``: the task's batch "
                                                      "size).")
    dhnm_s0_min: float = option(_eq6_default("s0_min"), help="a negative is replaced when its score S0 at activation "
                                                             "is below this (eq. 6).")
    dhnm_drop_ratio: float = option(_eq6_default("drop_ratio"), help="a negative is also replaced when "
                                    "``dhnm_drop_ratio`` · S < S0 and S < ``dhnm_s_max`` (S its current score; eq. 6).")
    dhnm_s_max: float = option(_eq6_default("s_max"), help="the upper bound on S of that second rule (eq. 6).")
    dhnm_score_baseline: float = option(_eq6_default("score_baseline"), help="opt-in, for models whose cosines bunch "
                                        "near 1: eq. 6 judges (S - b) / (1 - b) with b this value, the cosine of "
                                        "unrelated texts (measure it with conan_hf.dhnm.unrelated_score_baseline); "
                                        "0 is the paper's rule.")
    num_train_epochs: float = option(2.0, help="passes over the training data (when ``max_steps`` is ``-1``); 2 by "
                                               "default (the paper states none): the second pass trains the first "
                                               "pass's DHNM replacements.")
    mask_false_negatives: bool = option(True, help="InfoNCE leaves documents identical to a query's positive out of "
                                                   "its negatives.")
    false_negative_margin: float | None = option(None, help="``None`` or a margin m: InfoNCE also leaves out "
                                                 "negatives scoring above the positive's score minus m "
                                                 "(:class:`conan_hf.losses.InfoNCELoss`).")
    teacher: str | None = option(None, help="SentenceTransformer used to mine negative pools for retrieval/clr tasks "
                                            "whose data has none.")
    pool_size: int = option(32, help="candidates mined per example.")
    lora: dict | None = option(None, help="``None`` (full fine-tuning) or LoRA settings, e.g. ``{r: 16, lora_alpha: "
                                          "32, lora_dropout: 0.05}`` (Table 6).")
    pooling: str | None = option(None, help="``mean`` or ``lasttoken`` for a model folder that is not yet a "
                                            "SentenceTransformer; ``None``: ``lasttoken`` with causal attention, else "
                                            "``mean`` (a SentenceTransformer keeps its saved pooling).")
    attention_mode: str = option("bidirectional", help="``bidirectional`` (a stock decoder gets transformers' "
                                 "``is_causal=False``) or ``causal`` (the e5-mistral / gte-Qwen2 style, with "
                                 "last-token pooling and right padding). Encoders (BERT-like) are bidirectional only.")
    max_seq_length: int = option(512, help="texts are truncated to this many tokens.")
    multi_dataset_sampler: str = option("proportional", help="``proportional`` (tasks sampled in proportion to their "
                                                             "size) or ``round_robin``.")
    export_format: str = option("stock", help="``stock`` writes the final embedder with stock transformers classes, "
                                "loadable without ``trust_remote_code`` (a Conan backbone becomes a ``LlamaModel`` "
                                "with ``is_causal: false``, see :mod:`conan_hf.export`); ``remote_code`` saves a Conan "
                                "backbone with its own code files, as stages 1-3 do.")
    eval_data: dict | None = option(None, help="dev sets of training tasks, evaluated during training: ``{task name: "
                                    "data sources}`` (e.g. ``{stsb: [stsb-dev.csv]}``), read like that task's "
                                    "``data`` and encoded with its prompt; an ``sts`` task's dev set is scored by "
                                    "Spearman correlation (``eval_<task>_spearman_cosine``), a ``retrieval`` / ``clr`` "
                                    "task's by nDCG@10 over its positives and negatives (``eval_<task>_cosine_ndcg@10``"
                                    ").")
    eval_strategy: str = option("no", help="when the ``eval_data`` dev sets are evaluated: ``no``, ``steps`` (every "
                                           "``eval_steps``) or ``epoch``.")
    eval_steps: int | None = option(None, help="evaluate every this many steps (``None``: ``logging_steps``).")
    load_best_model_at_end: bool = option(False, help="end with the checkpoint that scored best on "
                                          "``metric_for_best_model`` (needs ``eval_strategy: steps`` and "
                                          "``save_steps`` a multiple of ``eval_steps``); that model is the one saved.")
    metric_for_best_model: str | None = option(None, help="the dev metric that ranks checkpoints (``None``: the main "
                                               "metric of the first ``eval_data`` task, e.g. "
                                               "``stsb_spearman_cosine``).")

    FINGERPRINT_IF_SET: ClassVar[dict[str, Any]] = {
        **StageConfig.FINGERPRINT_IF_SET, "eval_data": None, "eval_strategy": "no", "eval_steps": None,
        "load_best_model_at_end": False, "metric_for_best_model": None}

    def __post_init__(self) -> None:
        from conan_hf.export import EXPORT_FORMATS

        super().__post_init__()
        self._check_evaluation()

        if self.attention_mode not in STAGE4_ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {STAGE4_ATTENTION_MODES} in stage 4 (the soft mask is "
                             f"stage 3's), got {self.attention_mode!r}")
        if self.pooling not in (None, "mean", "lasttoken"):
            raise ValueError(f"pooling must be mean, lasttoken or null, got {self.pooling!r}")
        if self.export_format not in EXPORT_FORMATS:
            raise ValueError(f"export_format must be one of {EXPORT_FORMATS}, got {self.export_format!r}")

    def _check_evaluation(self) -> None:
        """One line naming the option for evaluation options that do not fit together."""
        if self.eval_strategy not in ("no", "steps", "epoch"):
            raise DataError(f"--eval_strategy must be no, steps or epoch, got {self.eval_strategy!r}",
                            hint="fix the option")
        if self.eval_data is not None and not isinstance(self.eval_data, dict):
            raise DataError(f"--eval_data must map task names to data sources, got {self.eval_data!r}",
                            hint="write e.g. eval_data: {stsb: [stsb-dev.csv]}")
        if self.eval_strategy != "no" and not self.eval_data:
            raise DataError(f"--eval_strategy {self.eval_strategy} needs dev data", hint="set --eval_data "
                            "'{TASK: [DEV_FILE]}' (a training task's dev set), or leave --eval_strategy no")
        if self.load_best_model_at_end:
            if self.eval_strategy != "steps":
                raise DataError("--load_best_model_at_end needs --eval_strategy steps (checkpoints are saved every "
                                "save_steps)", hint="set --eval_strategy steps and --eval_data")
            every = self.eval_steps or self.logging_steps
            if self.save_steps % every:
                raise DataError(f"--load_best_model_at_end needs --save_steps ({self.save_steps}) to be a multiple of "
                                f"--eval_steps ({every})", hint="change one of them")

    def evaluation_kwargs(self) -> dict[str, Any]:
        """The Trainer's evaluation arguments (``eval_strategy``, ``eval_steps``, ``load_best_model_at_end``,
        ``metric_for_best_model``); none when ``eval_strategy`` is ``no``."""
        from conan_hf.training.evaluation import dev_metric

        if self.eval_strategy == "no":
            return {}
        metric = self.metric_for_best_model
        if metric is None:
            first = next(iter(self.eval_data))
            types = {t.name: t.type for t in self.task_configs()}
            metric = dev_metric(first, types[first]) if types.get(first) in ("sts", "retrieval", "clr") else None
        return {"eval_strategy": self.eval_strategy, "eval_steps": self.eval_steps,
                "load_best_model_at_end": self.load_best_model_at_end, "metric_for_best_model": metric}

    def training_arguments_kwargs(self) -> dict[str, Any]:
        """:meth:`StageConfig.training_arguments_kwargs` with :meth:`evaluation_kwargs`."""
        return {**super().training_arguments_kwargs(), **self.evaluation_kwargs()}

    def task_configs(self) -> list[TaskConfig]:
        tasks = [t if isinstance(t, TaskConfig) else config_from_dict(TaskConfig, dict(t), f"tasks[{i}]")
                 for i, t in enumerate(self.tasks)]
        names = [t.name for t in tasks]
        if not tasks or len(set(names)) != len(names):
            raise ValueError(f"stage 4 needs at least one task and unique task names, got {names}")
        return tasks


# ---- batching --------------------------------------------------------------------------------------------------------
def dhnm_passes(config: SupervisedConfig, args: Any, rows: dict[str, int], batch_sizes: dict[str, int]) -> float:
    """How many times the planned run batches each example: ``num_train_epochs``, or ``max_steps`` worth of batches
    over the batches of one epoch (per-task ``ceil(rows / batch_size)``, the last one smaller, shared by ranks)."""
    if config.max_steps is None or config.max_steps <= 0:
        return float(config.num_train_epochs)
    per_epoch = sum(-(-rows[name] // batch_sizes[name]) for name in rows) / max(args.world_size, 1)
    trained = config.max_steps * args.gradient_accumulation_steps
    return trained / per_epoch if per_epoch else 0.0


# ---- the stage -------------------------------------------------------------------------------------------------------
class SupervisedRunner(StageRunner):
    """Stage 4: the stage-3 model (or yours) with a prompt per task, each task's rows in a memory-mapped table with its
    loss (InfoNCE with pool negatives, or CoSENT; Matryoshka over all), one negative pool with DHNM, per-task batch
    sizes, and the final export."""

    stage, number, config_class = "supervised", 4, SupervisedConfig
    table_dir: Path | None = None

    def run(self) -> dict[str, Any]:
        """:meth:`StageRunner.run`; a run that fails removes this process's task tables (``stage4_tables``): they
        are rewritten at each start, and a failed run leaves no partial output."""
        try:
            return super().run()
        except BaseException:
            if self.table_dir is not None:
                shutil.rmtree(self.table_dir, ignore_errors=True)
                for folder in (self.table_dir.parent, self.table_dir.parent.parent):  # when nothing else is left
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            raise

    def build_trainer(self):
        """Model first (its tokenizer checks the prompts), then the task tables, losses, pool and callbacks."""
        self.tasks = self.config.task_configs()
        self.prompts = {t.name: format_query_prompt(t.prompt) for t in self.tasks if t.prompt}
        model = self.load_model()
        datasets = self.load_datasets()
        losses = self.build_losses(model)
        pool = build_negative_pool(self.pool_tables, self.config.num_negatives, self.table_dir) \
            if self.pool_tables else None
        evaluator = self.build_evaluator()
        args = self.training_arguments()
        callbacks = self.build_callbacks(pool, losses, args, datasets)
        return self.create_trainer(model, datasets, args, losses=losses, pool=pool, callbacks=callbacks,
                                   evaluator=evaluator)

    def build_evaluator(self):
        """The dev sets of ``eval_data`` as one sentence-transformers evaluator (each read like its training task's
        data, encoded with its prompt; :func:`conan_hf.training.evaluation.dev_evaluator`), or None without
        ``eval_data`` or with ``eval_strategy: no``."""
        from sentence_transformers.evaluation import SequentialEvaluator

        from conan_hf.training.evaluation import dev_evaluator

        config = self.config
        if not config.eval_data or config.eval_strategy == "no":
            if config.eval_data:
                logger.warning("stage 4: eval_data is not evaluated with eval_strategy: no")
            return None
        tasks = {t.name: t for t in self.tasks}
        evaluators = []
        for name, sources in config.eval_data.items():
            if name not in tasks:
                raise DataError(f"--eval_data names task {name!r}, which is not a training task",
                                hint=f"use one of {sorted(tasks)}")
            dev = dataclasses.replace(tasks[name], data=sources)
            evaluators.append(dev_evaluator(name, dev.type, iter_task_examples(dev, seed=config.seed),
                                            prompt=self.prompts.get(name)))
        return evaluators[0] if len(evaluators) == 1 else SequentialEvaluator(evaluators)

    def load_model(self):
        """The model in ``attention_mode`` with the tasks' prompts (checked: on a token boundary, shorter than
        ``max_seq_length``); ``query`` is the first retrieval task's prompt unless the model has one; LoRA adapters
        when ``lora`` is set."""
        from conan_hf.sentence import check_prompt_boundary

        config, prompts = self.config, self.prompts
        model = load_sentence_model(config.model, attention_mode=config.attention_mode, pooling=config.pooling,
                                    max_seq_length=config.max_seq_length,
                                    prompts=mteb_prompt_names((t.name, t.type, prompts.get(t.name))
                                                              for t in self.tasks))
        self.attention = describe_attention(model)
        if config.attention_mode == "causal" and self.attention["pooling"] != "lasttoken":
            logger.warning("stage 4: causal attention with %s pooling: only the last token sees the whole text; "
                           "last-token pooling (pooling: lasttoken) is the usual choice", self.attention["pooling"])
        for name, prompt in prompts.items():
            if not model[1].include_prompt:  # the pooled tokens must be exactly the text's
                check_prompt_boundary(model.tokenizer, prompt, name=name)
            # Mean pooling leaves prompt tokens out; a prompt that fills max_seq_length leaves nothing to pool (NaN).
            length = len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if length >= config.max_seq_length:
                raise ValueError(f"the prompt of task {name!r} is {length} tokens, which leaves no room for the text "
                                 f"within max_seq_length={config.max_seq_length}; shorten the prompt or raise "
                                 "max_seq_length")
        if not model.prompts.get("query"):
            first = next((t.name for t in self.tasks if t.type in ("retrieval", "clr") and t.name in prompts), None)
            if first:  # so that `model.encode_query(...)` uses the retrieval instruction
                model.prompts["query"] = prompts[first]
        if config.lora:
            add_lora(model, dict(config.lora))
        self.model = model
        return model

    def load_datasets(self) -> dict[str, Any]:
        """Each task's rows, written to memory-mapped Arrow files (one folder per process, rewritten at each start:
        the same data gives the same files, so a resumed run's pools match its checkpoint), with the candidate
        negatives of the pool tasks (mined by ``teacher`` for retrieval tasks whose data has none) in
        ``self.pool_tables``; the pool holds row ids into them and the collator looks up each batch's texts only."""
        from conan_hf.dhnm import NegativePool

        config = self.config
        self.table_dir = Path(config.output_dir) / "stage4_tables" / f"process-{int(os.environ.get('RANK', '0'))}"
        shutil.rmtree(self.table_dir, ignore_errors=True)
        datasets: dict[str, Any] = {}
        self.pool_tables, self.pool_sizes, num_pool_rows = [], {}, 0
        for task in self.tasks:
            table = write_task_table(task, iter_task_examples(task, seed=config.seed), self.table_dir / task.name,
                                     first_id=num_pool_rows)
            if len(table.dataset) < 2:  # InfoNCE's in-batch negatives and CoSENT's ranked pairs need two rows
                raise DataError(f"stage 4 task {task.name!r} has {len(table.dataset) or 'no'} row(s); a task needs "
                                "at least 2 (its loss compares rows of a batch)",
                                hint="add rows to its data, or leave the task out")
            datasets[task.name] = table.dataset
            if task.type == "sts":
                continue
            if not table.pool_sizes.any() and config.teacher and task.type in ("retrieval", "clr"):
                mined = NegativePool.from_mining(table.dataset, config.teacher, k=config.num_negatives,
                                                 num_candidates=config.pool_size)
                table = TaskTable(table.dataset, texts=mined.text_table, pool_sizes=mined.pool_sizes,
                                  candidate_ids=mined.candidate_ids)
            if not table.pool_sizes.any():
                logger.warning("stage 4 task %r has no hard negatives (give negatives in the data or a teacher to "
                               "mine them); it trains on in-batch negatives only", task.name)
            self.pool_tables.append(table)
            num_pool_rows += len(table.dataset)
            self.pool_sizes[task.name] = int(table.pool_sizes.sum(dtype=np.int64))
        self.datasets = datasets
        return datasets

    def build_losses(self, model) -> dict[str, Any]:
        """A loss per task: CoSENT (eq. 2) for sts, else InfoNCE (eq. 1; classification against the row's own
        candidates only), each in Matryoshka representation learning when ``matryoshka`` is set."""
        from conan_hf.losses import CoSENTLoss, InfoNCELoss, MatryoshkaLoss

        config, losses = self.config, {}
        for task in self.tasks:
            if task.type == "sts":
                loss = CoSENTLoss(model, scale=config.cosent_scale)
            else:
                loss = InfoNCELoss(model, temperature=config.temperature,
                                   in_batch_negatives=task.type != "classification",
                                   mask_false_negatives=config.mask_false_negatives,
                                   false_negative_margin=config.false_negative_margin)
            losses[task.name] = MatryoshkaLoss(model, loss, config.matryoshka_dims) if config.matryoshka else loss
        self.losses = losses
        return losses

    def training_arguments(self):
        """sentence-transformers' arguments with each task's prompts and the multi-task batch sampler."""
        from sentence_transformers import SentenceTransformerTrainingArguments

        prompts = self.prompts
        return SentenceTransformerTrainingArguments(
            **self.training_arguments_kwargs(),
            prompts={t.name: ({"anchor": prompts[t.name]} if t.type != "sts" else
                              {"sentence1": prompts[t.name], "sentence2": prompts[t.name]})
                     if t.name in prompts else {} for t in self.tasks},
            multi_dataset_batch_sampler={"proportional": ProportionalTaskSampler,
                                         "round_robin": RoundRobinTaskSampler}[self.config.multi_dataset_sampler],
            # Each task's sampler keeps its last, smaller batch (MultiTaskTrainer); dropping only applies to
            # accelerate's sharding of whole batches over processes, as for any Trainer.
            dataloader_drop_last=True,
        )

    def build_callbacks(self, pool, losses, args, datasets) -> list[Any]:
        """DHNM (eq. 6) over the pool when ``dhnm`` is set (with a warning when the run cannot use its replacements),
        and the count of masked in-batch false negatives."""
        from conan_hf.dhnm import DHNMCallback

        config, tasks, callbacks = self.config, self.tasks, []
        self.dhnm_status = "DHNM on" if pool is not None and config.dhnm else "DHNM off"
        if pool is not None and config.dhnm:
            callbacks.append(DHNMCallback(pool, MultiTaskScores(losses.values()), s0_min=config.dhnm_s0_min,
                                          drop_ratio=config.dhnm_drop_ratio, s_max=config.dhnm_s_max,
                                          score_baseline=config.dhnm_score_baseline,
                                          requeue=config.dhnm_requeue, requeue_rows=config.dhnm_requeue_rows))
            passes = dhnm_passes(config, args, {t.name: len(datasets[t.name]) for t in tasks},
                                 {t.name: t.batch_size for t in tasks})
            if passes < 2 and not config.dhnm_requeue:
                self.dhnm_status = f"DHNM on but idle ({passes:.2f} passes over the data; see the warning)"
                logger.warning("DHNM cannot act: the run visits each example %.2f times, and a replaced negative is "
                               "only trained at the example's next visit; train at least 2 epochs (num_train_epochs: "
                               "2, the stage-4 default) or set dhnm: false", passes)
        self.false_negatives = FalseNegativeCountCallback(list(losses.values())) if pool is not None else None
        if self.false_negatives is not None:
            callbacks.append(self.false_negatives)
        self.dhnm_callback = next((c for c in callbacks if isinstance(c, DHNMCallback)), None)
        return callbacks

    def create_trainer(self, model, datasets, args, *, losses=None, pool=None, callbacks=(), evaluator=None):
        from datasets import DatasetDict

        tasks = self.tasks
        self.collator = collator = MultiTaskCollator(
            preprocess_fn=model.preprocess, prompts=args.prompts, pool=pool,
            pool_tasks=frozenset(t.name for t in tasks if t.type != "sts"))
        trainer = MultiTaskTrainer(
            model=model, args=args, train_dataset=DatasetDict(datasets), loss=losses, data_collator=collator,
            callbacks=list(callbacks), evaluator=evaluator, task_batch_sizes={t.name: t.batch_size for t in tasks},
            no_duplicate_tasks={t.name for t in tasks if t.type in ("retrieval", "clr")},
        )
        sizes = ", ".join(f"{t.name}: {len(datasets[t.name])} rows x {t.batch_size}" for t in tasks)
        print_main(f"[stage 4] supervised multi-task training of {self.config.model} ({sizes}); "
                   f"{'LoRA' if self.config.lora else 'full'} fine-tuning, {self.dhnm_status}")
        print_main(f"[stage 4] {self.attention['line']}")
        return trainer

    def after_training(self, trainer) -> None:
        if self.config.lora:
            merge_lora(self.model)

    def summary(self, trainer):
        dims = getattr(next(iter(self.losses.values())), "matryoshka_dims", None)
        dhnm_totals = self.dhnm_callback.replacement_summary() if self.dhnm_callback is not None else None
        note = ""
        if dhnm_totals is not None:
            note = self.dhnm_callback.summary_note()
        false_negatives = self.false_negatives
        if false_negatives is not None:
            note += f"{false_negatives.total} in-batch false negatives masked; "
        # Each epoch batches every row of a task once, so the rows that reached a batch are the rows collated, up to
        # the task's size (a resumed run counts the batches since it resumed; a multi-process run this process's).
        read = {t.name: len(self.datasets[t.name]) for t in self.tasks}
        trained = {name: min(rows, self.collator.rows_collated.get(name, 0)) for name, rows in read.items()}
        note = ", ".join(f"{name}: {read[name]} rows read, {trained[name]} trained" for name in read) + "; " + note
        evaluation = self.evaluation_summary(trainer)
        if evaluation is not None and evaluation["last"] is not None:
            best = evaluation["best"]
            note += (f"dev {evaluation['metric']}: {evaluation['last']:.4f} at the last evaluation"
                     + (f", best {best['value']:.4f} at step {best['step']} (the saved model)" if best else "") + "; ")
        return note, {
            **({"evaluation": evaluation} if evaluation is not None else {}),
            "attention": {k: v for k, v in self.attention.items() if k != "line"},
            "tasks": {t.name: {"type": t.type, "prompt": self.prompts.get(t.name), "rows": read[t.name],
                               "rows_trained": trained[t.name], "batch_size": t.batch_size,
                               "negative_candidates": self.pool_sizes.get(t.name, 0)} for t in self.tasks},
            "matryoshka_dims": sorted(dims) if dims else None, "prompts": dict(self.model.prompts),
            "dhnm": dhnm_totals,
            "false_negatives_masked": false_negatives.total if false_negatives is not None else None,
        }

    def evaluation_summary(self, trainer) -> dict[str, Any] | None:
        """The dev evaluations of the run: the ranking ``metric``, its ``last`` value, the ``best`` one with its step
        when ``load_best_model_at_end`` loaded it, and every evaluation's ``eval_*`` metrics by step (``history``);
        None when nothing was evaluated."""
        args = trainer.args
        history = [{"step": entry["step"], **{k: v for k, v in entry.items() if k.startswith("eval_")
                                               and not k.endswith(("_runtime", "_per_second"))}}
                   for entry in trainer.state.log_history if any(k.startswith("eval_") for k in entry)]
        metric = args.metric_for_best_model
        if not history or not metric:
            return None
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        best = None
        if args.load_best_model_at_end and trainer.state.best_model_checkpoint:
            best = {"value": trainer.state.best_metric,
                    "step": int(Path(trainer.state.best_model_checkpoint).name.rsplit("-", 1)[-1])}
        return {"metric": key, "last": history[-1].get(key), "best": best, "history": history}

    def write_model(self):
        """The final model exported per ``export_format`` (:func:`conan_hf.export.export_embedder`); its report goes
        into the stage record."""

        def export(folder):
            from conan_hf.export import export_embedder

            report = export_embedder(self.model, folder, export_format=self.config.export_format).to_dict()
            report.pop("path")  # the staging folder; the record's final_dir is where it ends up
            # A few dimensions of the trained model's probe embeddings, for checks in processes without conan_hf.
            report["probe"] = {name: [vector[:16] for vector in vectors] for name, vectors in report["probe"].items()}
            return report

        return export


run, main = SupervisedRunner.entry_points(__doc__)


if __name__ == "__main__":
    main()
