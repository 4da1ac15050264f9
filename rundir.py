"""
The run directory (--out): what a run writes there, the checks that keep two runs from mixing in it, and the
checkpoint that lets an interrupted run continue exactly where it stopped (--resume).

    args.json         the flags of the run (a resumed run keeps the ones it started with)
    train_log.jsonl   one line per optimizer step
    checkpoint.pt     PEFT weights, optimizer state, step and RNG states, written atomically (tmp file, rename)
    checkpoint-sharded/   the same under --fsdp, each process's shards (torch.distributed.checkpoint)
    adapter/          the trained module, in the PEFT format for a LoRA
    eval-*.jsonl      per-example evaluations, one file per base and task (eval-old-gsm8k.jsonl, ...)
    results.json      the accuracies per task, by both scorers; it marks a finished run
    refit-new/        the upper bound's own run (--refit-new)

A resumed run reproduces the uninterrupted one bit for bit: the data order and the layer drops are functions of
(seed, step), and the checkpoint restores the weights, AdamW's moments and torch's RNG states.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist

import adapter as adapter_lib
import lora as lora_lib
from bases import is_main_process, read_json, read_torch_file
from transpeft import DROPPING, INTERVENTIONS, MASKING


def default_out(args, kind: str = "") -> Path:
    def short(name):
        return Path(str(name)).name.replace("/", "_")

    def rate(r):  # per-layer rates by a short hash of their values: two schedules never share a directory
        return r if isinstance(r, float) else "layerwise-" + hashlib.sha1(json.dumps(r).encode()).hexdigest()[:8]

    # the paper's two always, in the released recipe's order; any other intervention where it is on
    rates = f"cross{rate(args.p_cross)}-intra{rate(args.p_intra)}" + "".join(
        f"-{unit.tag}{rate(getattr(args, unit.name))}" for unit in INTERVENTIONS
        if unit not in (DROPPING, MASKING) and getattr(args, unit.name, 0.0))
    return Path("runs") / f"{short(args.old)}-{short(args.new)}-{args.peft}{kind}-{rates}-seed{args.seed}"


def save_peft(model, out_dir: Path, base: str) -> None:
    """Write the module to out_dir.tmp, then rename: a kill while saving never leaves a half-written adapter."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        if any(isinstance(m, lora_lib.LoRALinear) for m in model.modules()):
            lora_lib.save_lora(model, tmp, base_model_name_or_path=base)
        else:
            adapter_lib.save_adapter(model, tmp, base_model_name_or_path=base)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(out_dir, e) from None
    if is_main_process():
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)


class SaveFailed(OSError):
    """A write failed (a full disk, a quota): what was on disk before is intact."""

    def __init__(self, path: Path, error: Exception):
        why = error.strerror if isinstance(error, OSError) and error.strerror else "a write failed: is the disk full?"
        super().__init__(f"Writing {path} failed ({why}); what was saved before is intact: free some space, then run "
                         "the same command with --resume.")


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError of its zip writer
        tmp.unlink(missing_ok=True)
        raise SaveFailed(path, e) from None
    os.replace(tmp, path)


def checkpoint_state(model, optimizer, step: int) -> dict:
    return {
        "step": step,
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


CHECKPOINT_KEYS = {"step", "trainable", "optimizer", "torch_rng", "cuda_rng"}


def restore_checkpoint(model, optimizer, path: Path, total: int) -> int:
    """Restore what checkpoint_state saved; returns its step. A file that is not such a checkpoint, or one of another
    run (other weights or shapes, a step outside [0, total]), is one sentence."""
    state = read_torch_file(path)
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        missing = CHECKPOINT_KEYS - state.keys() if isinstance(state, dict) else CHECKPOINT_KEYS
        raise ValueError(f"{path} is not a checkpoint written by train.py (it lacks {', '.join(sorted(missing))}): "
                         "start the run again with --overwrite.")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    stored = state["trainable"] if isinstance(state["trainable"], dict) else {}
    if set(params) != set(stored) or any(not isinstance(stored[n], torch.Tensor) or stored[n].shape != p.shape
                                         for n, p in params.items()):
        raise ValueError(f"{path} holds other trainable weights than this run's PEFT module (other names or shapes: "
                         "another --lora-r?): start the run again with --overwrite.")
    step = checked_step(state["step"], total, path)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["trainable"][n])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return step


def checked_step(step, total: int, path: Path) -> int:
    """A checkpoint's step, refused unless it is a step of this run (0 ... total)."""
    if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= total):
        raise ValueError(f"{path} says it stopped at step {step!r}, which is not a step of this run's {total}: the "
                         "file was edited or belongs to another run; start the run again with --overwrite.")
    return step


SHARDED = "checkpoint-sharded"  # under --fsdp, instead of checkpoint.pt: a torch.distributed.checkpoint directory


def save_sharded(model, optimizer, step: int, path: Path) -> None:
    """checkpoint_state under FSDP, by every process together: each writes its shards of the trainable weights and of
    AdamW's state (torch.distributed.checkpoint), process 0 the step and every process's RNG state; into path.tmp,
    then renamed, so a kill while saving leaves the last complete checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    tmp, rank = path.with_name(path.name + ".tmp"), dist.get_rank()
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available()
                                  else None))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"trainable": weights, "optimizer": optim}, checkpoint_id=str(tmp))
    if rank == 0:  # with AdamW's moments only for the weights that had a gradient yet (a dropped FFN's LoRA may not)
        torch.save({"step": step, "rng": rngs, "optimized": sorted(optim["state"])}, tmp / "state.pt")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


def restore_sharded(model, optimizer, path: Path, total: int) -> int:
    """restore_checkpoint under FSDP: every process reads its shards and its own RNG state; returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    state = read_torch_file(path / "state.pt")
    step = checked_step(state.get("step") if isinstance(state, dict) else None, total, path / "state.pt")
    if len(state.get("rng") or []) != dist.get_world_size():
        raise ValueError(f"{path} was written by {len(state.get('rng') or [])} processes and this run has "
                         f"{dist.get_world_size()}: resume with as many (torchrun --nproc_per_node).")
    options = StateDictOptions(ignore_frozen_params=True)
    weights, optim = get_state_dict(model, optimizer, options=options)  # (AdamW's state made for every weight)
    optim["state"] = {name: v for name, v in optim["state"].items() if name in set(state.get("optimized", []))}
    loaded = {"trainable": weights, "optimizer": optim}
    try:
        dcp.load(loaded, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 -- DCP reports a foreign or damaged checkpoint in several error types
        raise ValueError(f"{path} is not this run's sharded checkpoint ({str(e)[:120]}): start the run again with "
                         "--overwrite.") from None
    # strict=False: the moments of the weights without a gradient yet are absent (the weights were read strictly)
    set_state_dict(model, optimizer, model_state_dict=loaded["trainable"], optim_state_dict=loaded["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    cpu_rng, cuda_rng = state["rng"][dist.get_rank()]
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    return step


# What a run writes into its directory, and the flags a resumed run may change: they decide how it runs, not what
# it computes (the checkpoint and the data order are the same whatever they are).
# results.json first: --overwrite deletes in this order, so a kill while it deletes never leaves a "finished" run
RUN_OUTPUTS = ("results.json", "args.json", "train_log.jsonl", "checkpoint.pt", SHARDED, "adapter", "refit-new")
LOCK = ".lock"  # held by the process that runs in the directory
HOW_FLAGS = ("device", "micro_batch_size", "eval_batch_size", "save_every", "stop_after", "resume", "overwrite",
             "compile", "grad_checkpointing", "out")


def run_outputs(out: Path) -> list[Path]:
    """What a run has written into out: RUN_OUTPUTS and the per-example evaluations (eval-<base>-<task>.jsonl)."""
    return [out / name for name in RUN_OUTPUTS if (out / name).exists()] + sorted(out.glob("eval-*.jsonl"))


def check_run_dir(out: Path, args, reuse: bool = False, locked: bool = False, defaults: dict | None = None) -> bool:
    """Refuse, before anything is written, a run that would lose or mix another: a finished run without --overwrite,
    an unfinished one without --resume or --overwrite, a --resume with other result-deciding flags than the run's, an
    --out that cannot be a directory. reuse: a finished run with --resume is accepted when its flags are this
    command's (the study's arms); returns whether the run is finished. locked: this process holds out's lock.
    defaults: each flag's default; a flag that a run's args.json lacks (added to the code after the run began) is
    accepted at its default, the value the run had in effect."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them.")
    for parent in (out, *out.parents):  # the nearest existing path must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a directory: choose another --out.")
            break
    if not locked:
        check_not_in_use(out)  # before anything else: a live run there is the first thing to say
    started = [path.name for path in run_outputs(out)]
    finished = (out / "results.json").exists()
    if finished and not args.overwrite and not (reuse and args.resume):
        raise ValueError(f"{out} already holds a finished run (results.json): pass --overwrite to replace it, or "
                         "another --out.")
    if started and not (args.resume or args.overwrite):
        raise ValueError(f"{out} holds an unfinished run ({', '.join(started)}): pass --resume to continue it, or "
                         "--overwrite to start it again (or choose another --out).")
    if not args.resume:
        return False
    if not finished and not ((out / "checkpoint.pt").exists() or (out / SHARDED).exists()):
        raise ValueError(f"Nothing to resume in {out}: it has no checkpoint.pt or {SHARDED} (none is written before "
                         "step --save-every). Start the run again with --overwrite.")
    if not (out / "args.json").exists():
        raise ValueError(f"{out} has a checkpoint but no args.json, so its flags are unknown: start the run again with "
                         "--overwrite.")
    stored, now = read_json(out / "args.json"), json.loads(json.dumps(vars(args), default=str))
    if not isinstance(stored, dict):
        raise ValueError(f"{out / 'args.json'} holds no flags (a JSON {type(stored).__name__}, not an object): restore "
                         "it, or start the run again with --overwrite.")
    if (stored.get("micro_batch_size") != now["micro_batch_size"] and now.get("peft") in ("lora", "dora")
            and now.get("lora_dropout", 0) > 0):
        raise ValueError(f"{out} was started with --micro-batch-size {stored.get('micro_batch_size')}: LoRA dropout "
                         "draws its masks per forward pass, so another split draws other masks and gives another "
                         "adapter. Resume with the original value (a run with --lora-dropout 0 may change it).")
    for name, value in now.items():  # (the data's fingerprint: check_data)
        if name in HOW_FLAGS or name == "data_sha256" or (name not in stored and (defaults or {}).get(name) == value):
            continue
        if stored.get(name) != value:
            flag = "--" + name.replace("_", "-")
            began = (f"with {flag} {stored[name]}" if name in stored else
                     f"before {flag} existed (as at its default, {(defaults or {}).get(name)})")
            raise ValueError(f"{out} was started {began} and this command says {value}: a "
                             "resumed run keeps the flags that decide its result (only "
                             f"{', '.join('--' + h.replace('_', '-') for h in HOW_FLAGS)} "
                             "may change). Resume with the original value, or start again with --overwrite.")
    return finished


def remove(*paths: Path) -> None:
    """Delete files and directories that may or may not exist."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def begin_run(out: Path, args) -> None:
    """After every check: clear a run that --overwrite replaces, remove what an interrupted save left behind, and
    record the flags (a resumed run keeps the args.json it started with)."""
    if not is_main_process():
        return
    try:
        if args.overwrite:
            remove(*run_outputs(out))
        remove(*(where / f"{name}.tmp" for where in (out, out / "refit-new")
                 for name in ("checkpoint.pt", SHARDED, "adapter")))
        if not args.resume:
            (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror}): choose another directory.") from None


def interrupted(args, argv: list[str], toy_out: Path) -> str:
    """The one line a Ctrl-C ends with: where the last checkpoint is, and the command that continues from it."""
    if args.old is None:
        again = shlex.join([a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"])
        return (f"interrupted: the toy study in {toy_out} is incomplete; continue it (finished arm-seeds are kept) "
                f"with: python train.py {again}")
    out = Path(args.out) if args.out else default_out(args)
    flags = [a for a in argv if a not in ("--resume", "--overwrite")]
    ckpt = next((out / where / name for where in ("refit-new", ".") for name in ("checkpoint.pt", SHARDED)
                 if (out / where / name).exists()), None)
    if ckpt is None:
        again = shlex.join(flags + ["--overwrite"])
        return f"interrupted before the first checkpoint in {out}; start again with: python train.py {again}"
    again = shlex.join(flags + ["--resume"])
    return f"interrupted: the last checkpoint is {ckpt}; continue with: python train.py {again}"


def decided_by_rank0(decide):
    """decide() in process 0 alone; every process gets its result, or its refusal as a ValueError. So no process
    reads a directory that another is writing (under torchrun the others would see rank 0's fresh args.json)."""
    outcome = [None, None]
    if is_main_process():
        try:
            outcome[0] = decide()
        except (ValueError, OSError) as e:
            outcome[1] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise ValueError(outcome[1])
    return outcome[0]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(out: Path, args) -> Path:
    """Create out/.lock (exclusively: of two processes, one wins) holding this process's id and host, for the run's
    life: a second process on the same --out is refused. A lock whose process no longer runs on this host (a killed
    run) is named, and --resume or --overwrite takes it over."""
    path, host = out / LOCK, socket.gethostname()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                pid = check_not_in_use(out)
                if not (args.resume or args.overwrite):
                    raise ValueError(f"{out} has a stale lock of process {pid}, which no longer runs: pass --resume to "
                                     "continue that run, or --overwrite to start again.")
                path.unlink(missing_ok=True)
        os.write(fd, f"{os.getpid()} {host}".encode())
        os.close(fd)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror}): choose another directory.") from None
    return path


def check_not_in_use(out: Path) -> str | None:
    """Refuse a directory whose lock names a process that still runs (or one on another host, which cannot be asked);
    return the process id of a stale lock, None where there is no lock. A lock this code did not write (a directory,
    unreadable bytes, no "<pid> <host>": a kill between its creation and its first write leaves it empty) is named."""
    path = out / LOCK
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a run's lock: remove it, then run again.")
    try:
        pid, _, owner = path.read_bytes().decode("utf-8").strip().partition(" ")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (UnicodeDecodeError, OSError):
        pid, owner = "", ""
    if not pid.isdigit() or not owner:
        raise ValueError(f"{path} is not a lock that a run wrote (it holds no process id and host; a run killed as it "
                         f"began leaves it so): if no run is using {out}, remove it, then run again.")
    if owner != socket.gethostname() or _running(int(pid)):
        raise ValueError(f"{out} is in use by another run (process {pid} on {owner}, {path}): wait for it to finish, "
                         "or choose another --out (remove the lock only if that run is over).")
    return pid


def release_lock(path: Path | None) -> None:
    if path is not None and is_main_process():
        path.unlink(missing_ok=True)


def check_data(out: Path, args, fingerprint: str) -> None:
    """A resumed run refuses data that changed since it started (the same path, other records): the sha256 of every
    record it uses is in its args.json."""
    if not (args.resume and (out / "args.json").exists()):
        return
    stored = read_json(out / "args.json").get("data_sha256")
    if stored is None:
        raise ValueError(f"{out} was started by a version that did not record its data's fingerprint, so a change of "
                         "the data since cannot be seen: start it again with --overwrite (or finish it with that "
                         "version).")
    if stored != fingerprint:
        raise ValueError(f"The training or evaluation data changed since {out} was started (its records hash to "
                         f"{stored[:12]}..., now {fingerprint[:12]}...): resume with the original data, or start "
                         "again with --overwrite.")
