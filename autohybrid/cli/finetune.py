"""autohybrid finetune: distil a compressed model from its dense teacher, then export it.

The compressed model is a folder written by `autohybrid apply` (--exported), or an allocation
applied here first, exactly as `apply` does (--allocation with --model/--checkpoint). Training
is ``autohybrid.finetune.finetune``; its state is kept in OUT/finetune/, so a rerun resumes.
"""

from __future__ import annotations

from pathlib import Path

from autohybrid.cli.common import add_model_args, load_model
from autohybrid.exceptions import ConfigError

# flag -> FinetuneConfig key (the flag's default None leaves the library's default)
FLAGS = {"epochs": "epochs", "steps": "steps", "lr": "lr", "batch_size": "batch_size",
         "optimizer": "optimizer", "weight_decay": "weight_decay", "warmup": "warmup",
         "temperature": "temperature", "alpha": "alpha", "seed": "seed",
         "save_every": "save_every"}


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a compressed model against its dense "
                       "teacher (distillation) and export it")
    src = p.add_argument_group("compressed model (one of)")
    src.add_argument("--exported", help="folder written by `autohybrid apply` / `search`")
    src.add_argument("--allocation", help="allocation YAML: compress --model first, as "
                     "`autohybrid apply --data` does")
    add_model_args(p, required=False)
    p.add_argument("--no-teacher", action="store_true",
                   help="train on labels only (then --exported needs no --model)")
    p.add_argument("--data", required=True, help="digits | cifar10:DIR | imagefolder:DIR: "
                   "trains on its train split, reports its test split")
    p.add_argument("--limit", type=int, help="report on the first N test samples only")
    p.add_argument("--calib", type=int, help="with --allocation: calibration images of the "
                   "data fit (default: what the allocation records, else 1024)")
    p.add_argument("--calib-seed", type=int, help="with --allocation: calibration subset seed "
                   "(default: recorded, else 0)")
    g = p.add_argument_group("fine-tune (unset: autohybrid.finetune.FinetuneConfig defaults)")
    g.add_argument("--config", help="YAML of FinetuneConfig keys; flags override it")
    g.add_argument("--epochs", type=float, help="passes over the train split (default 1)")
    g.add_argument("--steps", type=int, help="optimizer steps; overrides --epochs")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    g.add_argument("--batch-size", type=int, help="default 128")
    g.add_argument("--optimizer", help="adamw (default) | sgd")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup", type=float, help="fraction of the steps warming up")
    g.add_argument("--temperature", type=float, help="distillation temperature (default 4)")
    g.add_argument("--alpha", type=float,
                   help="weight of the distillation term (default 0.7; 0: labels only)")
    g.add_argument("--seed", type=int, help="seed of data order and augmentation")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (default: epoch)")
    g.add_argument("--no-augment", action="store_true", help="no random crops / flips")
    g.add_argument("--flip", choices=("auto", "on", "off"), default="auto",
                   help="random horizontal flips (auto: off for digits, as `search` does)")
    p.add_argument("--out", required=True, help="output folder (model.safetensors + "
                   "allocation, as `apply` writes; the training state in OUT/finetune/)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.set_defaults(func=run)


def finetune_config(args):
    """--config, then the flags, as a validated ``FinetuneConfig``."""
    import yaml

    from autohybrid.finetune import FinetuneConfig

    base = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"fine-tune config {args.config!r} not found")
        try:
            base = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError(f"{path}: malformed YAML; fix the file") from None
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: expected a mapping of FinetuneConfig keys")
    for flag, key in FLAGS.items():
        if getattr(args, flag) is not None:
            base[key] = getattr(args, flag)
    if args.no_augment:
        base["augment"] = False
    if args.flip != "auto":
        base["flip"] = args.flip == "on"
    elif "flip" not in base:
        base["flip"] = not str(args.data).strip().lower().startswith("digits")
    return FinetuneConfig.from_dict(base, args.config or "fine-tune options")


def run(args) -> int:
    import torch

    import autohybrid as ah
    from autohybrid.apply import model_inventory
    from autohybrid.data import load_data
    from autohybrid.evaluate import evaluate
    from autohybrid.export import ALLOCATION
    from autohybrid.finetune import finetune
    from autohybrid.models import check_num_classes

    if bool(args.exported) == bool(args.allocation):
        raise ConfigError("give either --exported DIR (a compressed model) or --allocation "
                          "YAML (with the --model/--checkpoint it compresses)")
    config = finetune_config(args)
    needs_dense = bool(args.allocation) or not args.no_teacher
    if needs_dense and not args.model:
        raise ConfigError("give --model and --checkpoint: the dense model, the teacher to distil "
                          "from" + (" and what --allocation compresses" if args.allocation
                                    else "; or --no-teacher to train on labels only"))
    dense = inv = None
    if needs_dense:
        dense, size = load_model(args)
    if args.exported:
        student = ah.load(args.exported)
        alloc = ah.Allocation.load(Path(args.exported) / ALLOCATION)
        if dense is not None:
            inv = model_inventory(dense, alloc)
            alloc.validate(inv)  # the teacher is the model this one was compressed from
        size = args.input_size or student.pretrained_cfg.get("input_size")
        data = load_data(args.data, student, input_size=size)
    else:
        student, alloc, inv, data = _compress(args, dense, size)
    teacher = None if args.no_teacher else dense
    if teacher is not None:
        check_num_classes(teacher, data.num_classes, data.spec)
    test = data.test
    if args.limit:
        test = torch.utils.data.Subset(test, range(min(args.limit, len(test))))

    before = evaluate(student, test, progress=False, reference=teacher)
    print(f"before: {_result(before)}  ({before['n']} test samples)")
    history = finetune(student, teacher, data.train, config,
                       checkpoint_dir=Path(args.out) / "finetune", progress=True,
                       eval_dataset=test)
    if history["steps_run"] == 0:
        print(f"already fine-tuned: {history['steps']} steps recorded in {args.out}/finetune/")
    else:
        again = f", resumed at step {history['resumed_from']}" if history["resumed_from"] else ""
        print(f"fine-tuned {history['steps_run']} steps ({history['epochs']:.2f} epochs{again}; "
              f"last epoch's loss {history['loss']:.4f}, {history['seconds']:.1f} s)")
    print(f"after:  {_result({**history, 'loss': history['eval_loss']})}")
    out = ah.export(student, alloc, args.out)
    if args.onnx:
        ah.export_onnx(student, Path(out) / "model.onnx", alloc.input_size, alloc=alloc,
                       inv=inv)
    if inv is not None:
        print(f"counted: {alloc.cost(inv)}")
    print(f"wrote {out}/")
    return 0


def _compress(args, dense, size):
    """--allocation: compress the dense model as `autohybrid apply --data` does."""
    from autohybrid.cli.apply import compress

    return compress(dense, size, args.allocation, args.input_size, args.data, args.calib,
                    args.calib_seed)


def _result(r: dict) -> str:
    text = f"top-1 {r['top1']:.2f} %  loss {r['loss']:.4f}"
    if "agreement" in r:
        text += f"  agreement with the dense model {r['agreement']:.2f} %"
    return text
