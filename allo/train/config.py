"""Every option of allo-train, with TRL's names where TRL has one. The CLI is generated from this
dataclass (flag = field name, help = the field's ``help``), and a YAML ``--config`` uses the same keys.

Learning rates: the released ALLO scripts train 7B models with warm-up 1e-6, forgetting 5e-7 and
improving 5e-6. The built-in 0.26M-parameter model needs larger steps: warm-up 5e-5 and forgetting
2.5e-5 keep the released ratio (forget = warm-up / 2) at 50x the released scale, but improving is
5e-5, not the released warm-up x 5: on the built-in tasks any DPO-style stage much above 5e-5 lowers
greedy answer accuracy (full-parameter DPO, arithmetic, seed 0: SFT 0.31; lr 1e-5 0.28, 5e-5 0.23,
2.5e-4 0.07; ALLO's improve at 2.5e-4 0.155, at 1e-4 0.26, at 5e-5 0.305), because the preference
pairs differ in one or two digits and DPO lowers the chosen digit along with the rejected one
(likelihood displacement; benchmarks/bench_alignment.py and the README's results section). Set all
three for real models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from allo.loss_options import LOSS_TYPES, label_smoothing_problem

from .reporting import report_problem
from .tasks import ANSWER_PATTERN, TASKS, answer_pattern_problem

STAGES = ("prepare", "warmup", "select", "forget", "improve", "eval")
TRAINED_STAGES = ("warmup", "forget", "improve")
EVAL_MODELS = ("sft", "warmup", "forget", "improve")  # models the eval stage can score, in pipeline order
# transformers' schedulers (SchedulerType values) that get_scheduler builds from a warm-up and a step count
# alone; the others need lr_scheduler_kwargs (cosine_with_min_lr, warmup_stable_decay, ...) or a metric
# each step (reduce_lr_on_plateau), which allo-train does not pass
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
# options that are counts, with their smallest meaningful value (a smaller one would fail mid-run, or
# silently mean something else: per_device_eval_batch_size 0 was read as 1, score_batches 0 gave all-zero scores)
_AT_LEAST = {"per_device_eval_batch_size": 1, "generation_batch_size": 1, "score_batches": 1, "save_steps": 0,
             "save_total_limit": 0, "sft_steps": 0, "model_hidden_size": 1, "model_num_layers": 1,
             "num_sft_problems": 1, "num_train_problems": 1, "num_eval_problems": 1, "num_samples": 1,
             "max_pairs_per_problem": 1, "max_new_tokens": 1}

# options that name a local file or folder (a hub or dataset name is left as it is: it does not start with ~)
_PATH_OPTIONS = ("model_name_or_path", "warmup_model_path", "dataset_name", "train_file", "eval_file", "negatives_file",
                 "problems_file", "eval_problems_file", "output_dir", "reuse_from", "resume_from_checkpoint")


class RunError(ValueError):
    """The options or the output folder cannot make a run; the message names the option and how to fix it
    (the CLI prints it as one ``allo-train: error:`` line)."""


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- model and data (TRL names)
    model_name_or_path: str | None = _f(None, "starting (SFT) model: a local folder or hub name. Default: the built-in "
                                        "tiny Llama, SFT-trained on the built-in task during `prepare`")
    warmup_model_path: str | None = _f(None, "a full-parameter DPO model trained from --model_name_or_path "
                                       "elsewhere (e.g. with TRL's DPOTrainer; a local folder): ALLO's warm-up "
                                       "model for the weight-delta scores, the implicit token weights and eval, "
                                       "so the warmup stage is not run")
    attn_implementation: str | None = _f(None, "attention kernel the models run with, as transformers' "
                                         "attn_implementation takes it ('sdpa', 'eager', 'flash_attention_2', "
                                         "'flex_attention', a hub kernel); default: transformers' choice")
    trust_remote_code: bool = _f(False, "let a model folder or hub model run its own code (an architecture "
                                 "transformers does not have); only for models whose code you trust")
    task: str = _f("arithmetic", "built-in task with checkable answers, used when no data is given",
                   choices=tuple(TASKS))
    dataset_name: str | None = _f(None, "a `datasets` name with prompt/chosen/rejected columns (instead of --train_file)")
    dataset_config: str | None = _f(None, "configuration (subset) of --dataset_name, as "
                                          "`datasets.load_dataset(name, config)` takes it (e.g. 'main' for "
                                          "openai/gsm8k)")
    dataset_train_split: str = _f("train", "split of --dataset_name to train on")
    dataset_test_split: str = _f("test", "split of --dataset_name to evaluate on ('none': no held-out pairs)")
    train_file: str | None = _f(None, "preference pairs (.jsonl/.json/.parquet): prompt, chosen, rejected")
    eval_file: str | None = _f(None, "held-out preference pairs, same format")
    negatives_file: str | None = _f(None, "wrong responses to forget (prompt, response [, token_weights | keep_probs]). "
                                    "Default: every distinct rejected response of the training pairs")
    problems_file: str | None = _f(None, "problems with checkable answers (prompt, answer) for `prepare` on your own model")
    eval_problems_file: str | None = _f(None, "held-out problems (prompt, answer) for answer accuracy in `eval`")
    answer_pattern: str = _f(ANSWER_PATTERN, "regular expression whose one group is the answer in a "
                             "response (its last match counts), for judging samples in `prepare` and answers in "
                             "`eval`; compared with the problem's answer as numbers when both are, else as text "
                             "(case, space and a final period ignored). E.g. '#### (\\S+)' for GSM8K, "
                             "'answer is \\(?([A-E])' for multiple choice")
    output_dir: str = _f("allo_output", "every stage writes its own folder under this one; a run saves its options "
                         "in allo_config.json there, and a later run into it with other options is refused (see "
                         "--overwrite_output_dir)")
    overwrite_output_dir: bool = _f(False, "start over in an --output_dir that holds an earlier run: its outputs are "
                                    "removed first; `allo-train STAGE` removes that stage's and the later stages' "
                                    "only (and the reports), keeping the earlier stages it starts from (without this "
                                    "flag, a run whose options or data differ from the saved ones is refused, and "
                                    "one with the same options skips completed stages)")
    max_length: int = _f(1024, "longest prompt + response in tokens (TRL's default); the response loses its end "
                         "(see allo.train.data; the data's log line counts what was cut)")
    max_prompt_length: int | None = _f(None, "the prompt keeps its last this-many tokens (default: all)")
    max_completion_length: int | None = _f(None, "a response keeps its first this-many tokens, end of sequence "
                                           "included (default: all; --max_length still applies)")
    skip_bad_rows: bool = _f(False, "skip malformed data rows and count them, instead of stopping at the first")

    # --- training (TRL names)
    learning_rate: float = _f(5e-5, "warm-up (full-parameter DPO) learning rate")
    forget_learning_rate: float = _f(2.5e-5, "forgetting-stage learning rate (released script: warm-up / 2)")
    improve_learning_rate: float = _f(5e-5, "improving-stage learning rate (released script: warm-up x 5; the built-in "
                                      "task's default is warm-up x 1: larger rates lower its answer accuracy)")
    per_device_train_batch_size: int = _f(16, "pairs (or wrong responses) per device per micro-batch")
    per_device_eval_batch_size: int = _f(64, "sequences per device per evaluation batch")
    generation_batch_size: int = _f(256, "sequences per device per generate call: prepare's samples (prompts x "
                                    "--num_samples) and eval's greedy answers. Lower it if generation runs out of "
                                    "memory: its KV cache is about batch x tokens x layers x 2 x hidden x bytes "
                                    "(256 x 300 tokens of a 7B Llama in bf16: 38 GB). prepare's samples depend on "
                                    "it (each call draws its batch's random numbers together): a run compares it "
                                    "with the saved one")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    num_train_epochs: float = _f(1.0, "epochs per training stage (released scripts: 1)")
    max_steps: int = _f(-1, "if > 0: optimizer steps per training stage, overriding --num_train_epochs")
    warmup_ratio: float = _f(0.1, "fraction of steps of linear learning-rate warm-up before the cosine decay, "
                             "rounded down (transformers rounds up: a step of lr 0 first; --warmup_steps 0.1 reads "
                             "a fraction as it does)")
    warmup_steps: float = _f(0, "if > 0, overrides --warmup_ratio as transformers 5 reads it: a whole number of "
                             "warm-up steps, or a fraction of the stage's steps when below 1 (rounded up)")
    lr_scheduler_type: str = _f("cosine", "transformers' learning-rate schedule after the warm-up: "
                                + " | ".join(LR_SCHEDULERS))
    weight_decay: float = _f(0.0, "AdamW weight decay (released scripts: 0)")
    adam_epsilon: float = _f(1e-6, "AdamW epsilon (released scripts: 1e-6)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: no clipping)")
    beta: float = _f(0.1, "DPO / NPO temperature beta (released scripts: 0.1)")
    loss_type: str = _f("sigmoid", "DPO loss of the warm-up, of the gradient scores and of improve with --key_tokens "
                        "False: sigmoid (the paper's) | ipo | hinge | robust (TRL's forms, allo.losses.dpo_loss). The "
                        "key-token improve loss and eval's eval_loss / eval_rewards stay the sigmoid form (runs stay "
                        "comparable)", choices=LOSS_TYPES)
    label_smoothing: float = _f(0.0, "TRL's: the probability that a pair's preference is flipped, for the sigmoid "
                                "(conservative DPO) and robust losses of --loss_type; in [0, 0.5)")
    bf16: bool = _f(False, "bf16 autocast (over the weights of --dtype: fp32 master weights by default)")
    use_cpu: bool = _f(False, "run on the CPU even where a GPU is available (transformers' TrainingArguments.use_cpu)")
    dtype: str = _f("float32", "dtype the models are loaded and trained in (TRL's --dtype; --torch_dtype is the same "
                    "flag): float32 (the default: fp32 master weights, --bf16 autocasts over them), bfloat16 (half "
                    "the weights' memory; MaskedAdamW keeps fp32 copies of the selected elements, the warm-up's AdamW "
                    "keeps its moments in bf16, as TRL's does), or auto (as stored; float16 weights would train "
                    "without loss scaling: prefer bfloat16)", choices=("float32", "bfloat16", "auto"))
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    seed: int = _f(42, "seed for data order, sampling and initialisation")
    logging_steps: int = _f(5, "log metrics every this many optimizer steps")
    save_steps: int = _f(0, "checkpoint every this many optimizer steps (0: only the final model)")
    save_total_limit: int = _f(2, "checkpoints kept per stage (older ones are deleted; 0 keeps every one)")
    report_to: str = _f("all", "where metrics go besides each stage's metrics.jsonl (always written: the plots read "
                        "it): all (TensorBoard when installed; hosted trackers only when named) | none | a "
                        "comma-separated list of jsonl, tensorboard, wandb, mlflow (see allo.train.reporting: "
                        "projects, run names, WANDB_*/MLFLOW_* variables)")
    run_name: str | None = _f(None, "name of the run in wandb / mlflow: each stage is a run <run_name>-<stage>, "
                              "grouped under <run_name> (default: the folder name of --output_dir)")
    resume_from_checkpoint: str | None = _f(None, "continue an interrupted stage: 'true' for its latest checkpoint, "
                                            "or a checkpoint folder")
    disable_tqdm: bool = _f(False, "no progress bars")

    # --- ALLO
    score_source: str = _f("weight_delta", "neuron importance: weight_delta (|theta_warmup - theta_0|, the paper) | "
                           "gradient (|accumulated DPO gradient at theta_0|, no warm-up needed)", choices=("weight_delta", "gradient"))
    score_batches: int = _f(8, "batches the gradient score accumulates over")
    selection: str = _f("top", "which elements the masks keep: top (ALLO) | bottom | random | none (every element: "
                        "no neuron selection)", choices=("top", "bottom", "random", "none"))
    forget_ratio: float = _f(0.03, "fraction of all elements trained while forgetting (fewer than improving, as in the paper)")
    improve_ratio: float = _f(0.1, "fraction of all elements trained while improving (released script: 0.05)")
    exclude_ratio: float = _f(0.0, "leave out the top this-fraction of elements from both masks (the band's upper edge)")
    skip_forget: bool = _f(False, "ablation: no forgetting stage (improve starts from the SFT model)")
    key_tokens: bool = _f(True, "improve on the key tokens of rejected responses (False: plain DPO on every token)")
    eps: float = _f(0.1, "fraction of each rejected response's tokens that are key tokens (at least one)")
    token_weight_source: str = _f("auto", "forgetting token weights: data (token_weights in the negatives) | "
                                  "reward_model_probs (keep_probs: weight 1 where p < 0.5) | implicit_reward (the "
                                  "warm-up model's most negative log-ratios) | auto (data if the negatives carry "
                                  "token_weights, else implicit_reward)",
                                  choices=("auto", "data", "reward_model_probs", "implicit_reward"))
    raw_reward_probs: bool = _f(False, "with reward_model_probs: use the raw keep probabilities as weights, like the "
                                "released code, instead of 1[p < 0.5]")
    implicit_token_fraction: float = _f(0.1, "with implicit_reward: fraction of each wrong response's tokens weighted 1 "
                                        "(those the warm-up model pushed down most; only where it pushed them down)")

    # --- pipeline
    stages: str = _f("all", "comma-separated stages `run` goes through (default all: prepare,warmup,select,forget,improve,eval)")
    reuse_from: str | None = _f(None, "another run's output_dir: its completed --reuse_stages are linked, not redone "
                                "(same SFT model and data for every method of a comparison); a linked stage that runs again here "
                                "(run by name, or stale) gets a folder of its own: the other run is never written")
    reuse_stages: str = _f("prepare,warmup", "stages linked from --reuse_from")
    eval_models: str = _f("all", "comma-separated models the eval stage scores: sft, warmup, forget, improve "
                          "(default all: every one that exists; a comparison scores only the model it needs)")

    # --- built-in task and model
    sft_steps: int = _f(600, "built-in model: SFT optimizer steps")
    sft_learning_rate: float = _f(3e-3, "built-in model: SFT learning rate")
    model_hidden_size: int = _f(96, "built-in model: hidden size")
    model_num_layers: int = _f(2, "built-in model: decoder layers")
    num_sft_problems: int = _f(3000, "built-in task: problems with gold solutions for SFT")
    num_train_problems: int = _f(300, "built-in task: problems sampled for preference pairs")
    num_eval_problems: int = _f(200, "built-in task: held-out problems (eval pairs and answer accuracy)")
    num_samples: int = _f(8, "responses sampled per problem in `prepare` (released: about 10)")
    max_pairs_per_problem: int = _f(5, "preference pairs kept per problem (released: 5)")
    temperature: float = _f(0.7, "sampling temperature in `prepare`")
    top_p: float = _f(0.95, "nucleus sampling in `prepare`")
    max_new_tokens: int = _f(40, "longest sampled / generated response")

    def validate(self) -> "TrainConfig":
        # `~` expanded once, here: a YAML --config value reaches us unexpanded by the shell, and the checks
        # below expanded it while the stages did not (./~/out written; a model or data file "not found")
        for name in _PATH_OPTIONS:
            v = getattr(self, name)
            if isinstance(v, str) and v.startswith("~"):
                setattr(self, name, os.path.expanduser(v))
        if self.model_name_or_path is not None:
            problem = model_source_problem(self.model_name_or_path)
            problem = problem or (None if self.trust_remote_code else remote_code_problem(self.model_name_or_path))
            if problem:
                raise ValueError(f"--model_name_or_path {self.model_name_or_path}: {problem}")
        if self.warmup_model_path is not None:
            if self.model_name_or_path is None:
                raise ValueError("--warmup_model_path needs --model_name_or_path: the SFT model it was trained from "
                                 "(the built-in model is trained by `prepare`, and its warm-up by the warmup stage)")
            problem = model_source_problem(self.warmup_model_path)
            if problem is None and not os.path.isdir(os.path.expanduser(self.warmup_model_path)):
                problem = "expected a local model folder (the select stage reads its weight files)"
            problem = problem or architecture_difference(self.warmup_model_path, self.model_name_or_path,
                                                         trust_remote_code=self.trust_remote_code)
            if problem:
                raise ValueError(f"--warmup_model_path {self.warmup_model_path}: {problem}")
        problem = answer_pattern_problem(self.answer_pattern)
        if problem:
            raise ValueError(f"--answer_pattern {self.answer_pattern!r} {problem}")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name} is {v}; expected a positive number of tokens (or leave it out)")
        problem = label_smoothing_problem(self.label_smoothing, self.loss_type)
        if problem:
            raise ValueError(f"--label_smoothing {problem}")
        if self.dataset_config and not self.dataset_name:
            raise ValueError(f"--dataset_config {self.dataset_config!r} needs --dataset_name (the dataset it is a "
                             "configuration of)")
        for name in ("forget_ratio", "improve_ratio", "exclude_ratio", "eps", "implicit_token_fraction", "warmup_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"--{name} is {v}; expected a fraction in [0, 1]")
        if self.selection != "none":
            # a stage selects round(ratio*N) - round(exclude_ratio*N) elements: none at all when the ratio is not
            # above --exclude_ratio, and its optimizer would fail ("an empty parameter list") after warm-up and select
            for name in ("forget_ratio", "improve_ratio") if not self.skip_forget else ("improve_ratio",):
                if not getattr(self, name) > self.exclude_ratio:
                    raise ValueError(f"--{name} is {getattr(self, name)}; expected more than --exclude_ratio "
                                     f"({self.exclude_ratio}): the {name.split('_')[0]} stage would train no element "
                                     "(lower --exclude_ratio or raise the ratio; --selection none trains every element)")
        if not self.temperature > 0:  # here, not in transformers' generate after the SFT training
            raise ValueError(f"--temperature is {self.temperature}; expected > 0 (prepare samples its responses)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p is {self.top_p}; expected a fraction in (0, 1] (1: no nucleus cut)")
        if self.token_weight_source in ("data", "reward_model_probs") and self.negatives_file is None \
                and not self.skip_forget:
            field_name = "token_weights" if self.token_weight_source == "data" else "keep_probs"
            raise ValueError(f"--token_weight_source {self.token_weight_source} reads {field_name} from a "
                             "--negatives_file; give one whose rows carry them, or use --token_weight_source auto "
                             "or implicit_reward")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name} is {getattr(self, f.name)!r}; expected one of {', '.join(choices)}")
        if not self.warmup_steps >= 0 or (self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps)):
            raise ValueError(f"--warmup_steps is {self.warmup_steps}; expected a whole number of steps, or a fraction "
                             "in [0, 1) of each stage's steps")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")
        for name, least in _AT_LEAST.items():
            if getattr(self, name) < least:
                raise ValueError(f"--{name} is {getattr(self, name)}; expected >= {least}")
        for name, what in (("max_grad_norm", "0: no clipping"), ("adam_epsilon", "AdamW's epsilon"),
                           ("weight_decay", "0: none")):
            if not getattr(self, name) >= 0:  # (NaN too)
                raise ValueError(f"--{name} is {getattr(self, name)}; expected >= 0 ({what})")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ValueError(f"--lr_scheduler_type is {self.lr_scheduler_type!r}; "
                             + _scheduler_problem(self.lr_scheduler_type))
        problem = output_dir_problem(self.output_dir)
        if problem:
            raise ValueError(f"--output_dir {self.output_dir}: {problem}")
        bad = [m for m in self.eval_model_list() if m not in EVAL_MODELS]
        if bad:
            raise ValueError(f"--eval_models names unknown model(s) {bad}; models: {', '.join(EVAL_MODELS)}")
        bad = [s for s in self.stage_list() if s not in STAGES]
        if bad:
            raise ValueError(f"--stages names unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
        problem = report_problem(self.report_to)  # here, not after the first stage's reference pass
        if problem:
            raise ValueError(problem)
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs is {self.num_train_epochs}; expected > 0 (or set --max_steps)")
        if not self.beta > 0:  # here, not in the loss after the first stage's reference pass
            raise ValueError(f"--beta is {self.beta}; expected > 0")
        for name in ("learning_rate", "forget_learning_rate", "improve_learning_rate", "sft_learning_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} is {getattr(self, name)}; expected >= 0")
        for name in ("logging_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} is {getattr(self, name)}; expected >= 1")
        return self

    def num_warmup_steps(self, total: int) -> int:
        """Learning-rate warm-up steps of a stage of ``total`` optimizer steps. ``--warmup_ratio`` rounds
        down, so a short stage (the built-in task's) gets no warm-up step whose learning rate is 0;
        ``--warmup_steps`` below 1 rounds up, as transformers does for a fraction (TRL runs given
        ``--warmup_ratio`` get one more step where the product is not whole)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        if self.warmup_steps > 0:
            return math.ceil(total * self.warmup_steps)
        return int(self.warmup_ratio * total)

    def stage_list(self) -> list[str]:
        return list(STAGES) if self.stages == "all" else [s.strip() for s in self.stages.split(",") if s.strip()]

    def eval_model_list(self) -> list[str]:
        if self.eval_models == "all":
            return list(EVAL_MODELS)
        return [m.strip() for m in self.eval_models.split(",") if m.strip()]

    def load_options(self):
        """How a run reads its models, configs and tokenizers (--attn_implementation, --trust_remote_code)."""
        from .model import LoadOptions

        return LoadOptions(self.attn_implementation, self.trust_remote_code)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _scheduler_problem(name: str) -> str:
    try:
        from transformers.trainer_utils import SchedulerType

        known = {s.value for s in SchedulerType}
    except ImportError:  # (transformers is a dependency; this only keeps the message right without it)
        known = set()
    why = ("a transformers scheduler that needs options allo-train does not pass (lr_scheduler_kwargs, or a metric "
           "each step)") if name in known else "not one of transformers' schedulers (SchedulerType)"
    return f"{why}; choose from {', '.join(LR_SCHEDULERS)}"


def output_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be the output folder, or None: it is a file, or a folder above it is (found
    here, not after a model was loaded). A folder that cannot be created for other reasons (no
    permission, a read-only or virtual file system) is found when the run creates it."""
    local = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(local) and not os.path.isdir(local):
        return "is a file; give a folder (it is created if missing)"
    parent = os.path.dirname(local)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        return f"{parent} is a file, so no folder can be made under it; give another --output_dir"
    return None


# what a local model folder must hold for AutoModelForCausalLM / AutoTokenizer.from_pretrained
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_source_problem(path: str) -> str | None:
    """Why ``path`` cannot be the starting model, or None. Checked before any stage runs: a local folder
    needs a config.json and tokenizer files (else transformers fails later with a message about hub
    names or tokenizer conversion); a path that names no folder is an error when it looks like a path
    (starts with /, ./, ../ or ~, or has more than one /), and is left to the hub otherwise."""
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            return ("the folder has no config.json, so it is not a Hugging Face model folder; save one with "
                    "model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
        if not any(os.path.isfile(os.path.join(local, f)) for f in _TOKENIZER_FILES):
            return (f"the folder has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the model's tokenizer "
                    "into it with tokenizer.save_pretrained(folder)")
        return None
    if os.path.exists(local):
        return "is a file; expected a model folder (with config.json) or a hub name"
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        return ("no such folder; expected a local model folder (with config.json) or a hub name such as "
                "meta-llama/Llama-3.2-1B")
    return None


def remote_code_problem(path: str) -> str | None:
    """Why a local model folder cannot be read without --trust_remote_code (its config.json names code of
    its own for an architecture transformers does not have), or None. A hub name is not checked here:
    transformers refuses it when it is loaded."""
    config_file = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    auto_map = config.get("auto_map") or {}
    if not {"AutoConfig", "AutoModelForCausalLM"} & set(auto_map):
        return None
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:  # transformers has the architecture: its own code is used
        return None
    return (f"the model brings its own code (config.json's auto_map: {', '.join(sorted(set(auto_map.values())))}) for "
            f"an architecture transformers does not have ({config.get('model_type')!r}); pass --trust_remote_code true "
            "to run it, if you trust that code")


# config.json keys that fix the parameters' names and shapes of a Hugging Face causal LM
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def architecture_difference(path: str, base: str, *, trust_remote_code: bool = False) -> str | None:
    """How the model folder ``path`` differs in architecture from ``base`` (a folder; a hub name is
    not checked here), or None: a warm-up model must have the starting model's parameters, element for
    element, for the weight deltas (else the select stage fails after the reference passes). Compared
    as transformers reads the configs (defaults filled in: a config saved again by transformers may
    write keys the original left out)."""
    folders = [os.path.expanduser(p) for p in (path, base)]
    if not all(os.path.isfile(os.path.join(f, "config.json")) for f in folders):
        return None
    from transformers import AutoConfig

    configs = [AutoConfig.from_pretrained(f, trust_remote_code=trust_remote_code) for f in folders]
    diff = [f"{k} {getattr(configs[0], k, None)!r} vs {getattr(configs[1], k, None)!r}" for k in _SHAPE_KEYS
            if getattr(configs[0], k, None) != getattr(configs[1], k, None)]
    if diff:
        return (f"not the architecture of --model_name_or_path {base} ({'; '.join(diff)}); the warm-up model must be "
                "that model after DPO, with the same parameters")
    return None
