"""Sequential LoRA baselines: seq_lora, replay, ewc, inscl, ilora, olora.

One LoRA adapter (models/lora_simple.py) is trained through cfg.tasks in order, on the same data, steps and
evaluation as train_slsd_seq.py. Each method is two visible hooks around the same loop:
  * seq_lora: nothing; plain sequential fine-tuning, the forgetting reference.
  * replay:   end_of_task() refills a buffer of `replay_buffer_size` training rows split evenly over the
              tasks seen so far (seeded); every step a replay batch (half the batch size) is mixed into the
              forward pass and its mean loss is weighted by `replay_lambda`. With `--replay_mode mix` (replay,
              inscl, ilora; logged as {method}_mix) the replayed rows take half of the batch's places instead of
              joining it: a Seq-LoRA step's rows and cost, half as many current rows per step (utils_replay.py).
  * ewc:      end_of_task() estimates the diagonal empirical Fisher of the LoRA parameters in a separate
              pass in eval mode (mean of squared gradients over `ewc_fisher_batches` batches, divided by the
              true count) and stores theta*; penalty() = 0.5 * ewc_lambda * sum_t sum F_t (theta - theta*_t)^2,
              logged every step so a silent zero shows.
  * inscl:    replay whose buffer for task t is rebuilt at its start (inscl.InsCLReplay.start_of_task): the budget
              split over earlier tasks in proportion to the Wasserstein distance of their instruction embeddings
              from task t's, rows drawn within a task with probability rising with InsInfo (logged as split "inscl").
  * ilora:    I-LoRA (models/lora_variants.py): replay's buffer and batches train a fast LoRA; a slow LoRA follows it
              as an EMA after every optimizer step (`ilora_ema`); loss += `ilora_lambda` x MSE between the fast and
              the slow LoRA's last hidden states on the replayed rows (the slow pass runs no-grad, from the first
              adapted layer on). Evaluation, and the recovery probe, use the slow LoRA.
  * olora:    O-LoRA (models/lora_variants.py): each task trains a fresh LoRA while the earlier tasks' stay frozen and
              are summed into the forward (no task id); penalty() = `olora_lambda_orth` x sum |A_t A_i^T| (or the
              squares: `olora_orth_norm`) over earlier tasks i and modules + `olora_lambda_l2` x ||new LoRA||^2.

    python train_seq_baselines.py --method seq_lora
    python train_seq_baselines.py --method ewc --ewc_lambda 5000
    python train_seq_baselines.py --method seq_lora --lora_r 16 --lora_alpha 32 --run_name seq_lora_r16
    python train_seq_baselines.py --method seq_lora --num_frozen_layers 0 --run_name seq_lora_all_layers
    python train_seq_baselines.py --method replay --replay_mode mix      # compute-matched replay: logs as replay_mix
Logs: logs/seq_{method}_{task}_train_loss.jsonl, logs/seq_eval_loss.jsonl (+ metrics); adapters:
checkpoints/{method}/seq_{stage}_{task}/, where {method} is --run_name when given (so an r=16 run keeps its
own rows and checkpoints beside the r=8 one). Resumes after the last finished stage; --restart trains afresh.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from configs.base_config import parse_args_and_config, print_config, save_config
from models.lora_simple import (LORA_PREFIX, atomic_save_safetensors, get_lora_param_groups, load_lora,
                                mark_only_lora_as_trainable, print_trainable_parameters, replace_with_lora, save_lora)
from models.lora_variants import (consistency_loss, copy_slow_to_fast, decoder_from_layer, ema_update, load_olora,
                                  lora_view, olora_penalty, record_decoder, replace_with_ilora, replace_with_olora,
                                  start_olora_task)
from utils_dist import barrier, init_distributed, is_main
from utils_forward import autocast
from utils_model import load_model_and_tokenizer
from utils_replay import Replay
from utils_train import (JsonlLogger, Timer, accumulate_grads, apply_step, check_resume_config, forget_method_rows,
                         infinite_batches, is_done, kept_tokens_field, load_bench, load_eval_sets, load_knowledge,
                         load_task_dataset, make_loader, make_optimizer, make_scheduler, mark_done, mean_token_loss,
                         method_name, needs_recovery, read_done, run_recovery, run_stage_eval, set_seed, stage_dir,
                         steps_per_stage, to_device)

METHODS = ("seq_lora", "replay", "ewc", "inscl", "ilora", "olora")
REPLAY_METHODS = ("replay", "inscl", "ilora")  # the methods that replay rows (replay_mode applies to them)
ADAPTERS = {"ilora": replace_with_ilora, "olora": replace_with_olora}  # the rest: one plain LoRA (replace_with_lora)
# named configurations (compare.py, Makefile demo-full): a --run_name of these must come with its settings
NAMED_RUNS = {"seq_lora_r16": ("seq_lora", {"lora_r": 16, "lora_alpha": 32.0}),
              "seq_lora_all_layers": ("seq_lora", {"num_frozen_layers": 0})}


class EWC:
    """Diagonal-Fisher EWC over the LoRA parameters, accumulated over past tasks."""

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg):
        self.params, self.cfg = params, cfg
        self.fishers: list[dict] = []  # one {name: F} per past task
        self.anchors: list[dict] = []  # one {name: theta*} per past task

    def end_of_task(self, model, dataset, device, pad_id: int, seed: int) -> dict:
        """A separate pass after the task, in eval mode: F = mean over batches of grad^2 (true count)."""
        was_training = model.training
        model.eval()
        fisher = {n: torch.zeros_like(p) for n, p in self.params.items()}
        count = 0
        loader = make_loader(dataset, self.cfg.per_device_batch_size, pad_id, shuffle=True, seed=seed)
        for batch in loader:
            if count >= self.cfg.ewc_fisher_batches:
                break
            batch = to_device(batch, device)
            model.zero_grad(set_to_none=True)
            loss, _ = mean_token_loss(model, batch)
            if not torch.isfinite(loss):
                continue
            loss.backward()
            for n, p in self.params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
            count += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if count == 0:
            raise RuntimeError("EWC Fisher pass saw no usable batch; check the training split")
        fisher = {n: f / count for n, f in fisher.items()}
        self.fishers.append(fisher)
        self.anchors.append({n: p.detach().clone() for n, p in self.params.items()})
        return {"fisher_batches": count, "fisher_mean": float(torch.cat([f.flatten() for f in fisher.values()]).mean())}

    def penalty(self) -> torch.Tensor:
        total = next(iter(self.params.values())).new_zeros(())
        for fisher, anchor in zip(self.fishers, self.anchors):
            for n, p in self.params.items():
                total = total + (fisher[n] * (p - anchor[n]) ** 2).sum()
        return 0.5 * self.cfg.ewc_lambda * total

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for t, (fisher, anchor) in enumerate(zip(self.fishers, self.anchors)):
            out |= {f"fisher.{t}.{n}": v for n, v in fisher.items()} | {f"anchor.{t}.{n}": v for n, v in anchor.items()}
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], device) -> None:
        n_tasks = len({k.split(".")[1] for k in tensors})
        self.fishers = [{n: tensors[f"fisher.{t}.{n}"].to(device) for n in self.params} for t in range(n_tasks)]
        self.anchors = [{n: tensors[f"anchor.{t}.{n}"].to(device) for n in self.params} for t in range(n_tasks)]


class ILoRA:
    """I-LoRA's objective on top of Replay's: the replayed rows' last hidden states under the fast LoRA (from the
    training forward) are pulled toward those under the slow LoRA: loss += ilora_lambda * MSE (lora_variants)."""

    def __init__(self, model, replay: Replay, cfg):
        self.replay, self.cfg, self.decoder = replay, cfg, model.get_decoder()
        adapted = [i for i, layer in enumerate(self.decoder.layers)
                   if any(LORA_PREFIX in n for n, _ in layer.named_parameters())]
        self.first = adapted[0]  # the layers below compute the same under either LoRA: the slow pass starts here
        self.from_first: bool | None = None if self.first > 0 else False  # checked against a full pass on first use

    def loss_fn(self, model, batch) -> tuple[torch.Tensor, dict]:
        if not self.replay.items:  # stage 1: nothing to replay, no consistency term (as Replay)
            return mean_token_loss(model, batch)
        with record_decoder(self.decoder, self.first) as rec:  # the one training forward: current + replayed rows
            loss, extras = self.replay.loss_fn(model, batch)
        n = batch["input_ids"].shape[0]  # the current rows come first, the replayed ones after them
        mask = rec["attention_mask"][n:]
        T = int(mask.sum(1).max())  # right padding: the replayed rows end by T
        h_slow = self.slow_hidden(model, rec["input_ids"][n:, :T], mask[:, :T], rec["entering"][n:, :T])
        cons = consistency_loss(rec["last"][n:, :T], h_slow, mask[:, :T])
        return loss + self.cfg.ilora_lambda * cons, {**extras, "consistency": cons.detach()}

    @torch.no_grad()
    def slow_hidden(self, model, ids, mask, entering) -> torch.Tensor:
        """(R, T, H) last hidden states of the rows under the slow LoRA, in eval mode (no dropout): the decoder from
        layer `first` on, fed `entering` (the training forward's input of that layer), once that is checked to
        equal the whole decoder's result; else the whole decoder."""
        was_training = model.training
        model.eval()
        try:
            with lora_view(model, "slow"), autocast(model):
                if self.from_first is None:
                    self.from_first = self._upper_pass_matches(ids, mask)
                if self.from_first:
                    with decoder_from_layer(self.decoder, self.first):
                        return self.decoder(inputs_embeds=entering, attention_mask=mask,
                                            use_cache=False).last_hidden_state
                return self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            model.train(was_training)

    def _upper_pass_matches(self, ids, mask) -> bool:
        """Whether the layers from `first` on, fed the input that layer got in a whole pass over the same rows, give
        that pass's result (they do unless the decoder transforms inputs_embeds, as Gemma scales them)."""
        with record_decoder(self.decoder, self.first) as rec:
            full = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        with decoder_from_layer(self.decoder, self.first):
            upper = self.decoder(inputs_embeds=rec["entering"], attention_mask=mask, use_cache=False).last_hidden_state
        same = torch.allclose(upper.float(), full.float(), rtol=1e-4, atol=1e-5)
        if not same:
            print(f"[ilora] the slow pass from layer {self.first} differs from the whole decoder's for "
                  f"{type(self.decoder).__name__} (max {float((upper.float() - full.float()).abs().max()):.3g}); "
                  f"the slow pass runs every layer")
        return same


def train_step(model, batches, cfg, device, loss_fn, params, opt, sched, method: str, ewc: EWC | None = None):
    """One optimizer step of any method (bench_train_step.py times this): forward and backward of the micro-batches
    with `loss_fn`, the method's penalty added before the step (EWC; O-LoRA's orthogonality + L2), one clipped
    AdamW step, then I-LoRA's EMA of the slow LoRA. Returns (accumulate_grads' stats, the gradient norm or None when
    nothing was stepped, the penalty fields of the train log row)."""
    st = accumulate_grads(model, batches, cfg, device, loss_fn)
    terms = {}
    if ewc:
        penalty = ewc.penalty() if ewc.fishers and st["micro"] else None
        if penalty is not None:
            penalty.backward()
        terms["ewc_penalty"] = float(penalty.detach()) if penalty is not None else 0.0
    if method == "olora" and st["micro"]:  # logged unweighted; the step adds lambda_orth x orth + lambda_l2 x l2
        orth, l2 = olora_penalty(model, cfg.olora_orth_norm)
        (cfg.olora_lambda_orth * orth + cfg.olora_lambda_l2 * l2).backward()
        terms |= {"olora_orth": round(float(orth.detach()), 6), "olora_l2": round(float(l2.detach()), 4)}
    grad_norm = apply_step(params, [opt], [sched], cfg.max_grad_norm) if st["micro"] else None
    if method == "ilora" and grad_norm is not None:
        ema_update(model, cfg.ilora_ema)  # the slow LoRA follows every step the fast one takes
    return st, grad_norm, terms


def check_named_run(name: str | None, method: str, cfg) -> None:
    """A --run_name of NAMED_RUNS must come with its method and settings (its logs would claim what it did not run)."""
    if name not in NAMED_RUNS:
        return
    want_method, settings = NAMED_RUNS[name]
    wrong = {k: v for k, v in settings.items() if getattr(cfg, k) != v}
    if method != want_method or wrong:
        flags = " ".join(f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}" for k, v in settings.items())
        raise SystemExit(f"--run_name {name} names the configuration --method {want_method} {flags}; got --method "
                         f"{method}" + "".join(f", --{k} {getattr(cfg, k)}" for k in wrong))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--restart", action="store_true", help="delete this method's checkpoints and log rows first")
    parser.add_argument("--run_name", default=None,
                        help="method name in logs and checkpoints (default: --method); e.g. seq_lora_r16 for a "
                             "capacity-matched run beside the r=8 one")
    args, cfg = parse_args_and_config(parser, argv)
    init_distributed(cfg.device)  # under torchrun: join the group (utils_dist.py); a plain run is world size 1
    if cfg.replay_mode == "mix" and args.method not in REPLAY_METHODS:
        raise SystemExit(f"--replay_mode mix applies to the replay methods ({', '.join(REPLAY_METHODS)}); "
                         f"--method {args.method} replays nothing")
    default = args.method + ("_mix" if cfg.replay_mode == "mix" else "")  # replay_mix: its own rows and checkpoints
    method = method_name(cfg, args.run_name, default)  # + "+key" / "+low_ppl" with a token-selective loss
    check_named_run(args.run_name, args.method, cfg)
    print_config(cfg, method)
    log_dir = Path(cfg.log_dir)
    train_logs = [log_dir / f"seq_{method}_{t}_train_loss.jsonl" for t in cfg.tasks]
    if args.restart:
        if is_main():
            shutil.rmtree(Path(cfg.save_dir) / method, ignore_errors=True)
            forget_method_rows(cfg, method, 0, train_logs)
        barrier()
    set_seed(cfg.seed)
    model, tok, device = load_model_and_tokenizer(cfg)
    add_adapters = ADAPTERS.get(args.method, replace_with_lora)
    names = add_adapters(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                         cfg.num_frozen_layers)
    model.to(device)
    mark_only_lora_as_trainable(model)
    print(f"[{method}] LoRA on {len(names)} modules ({names[0]} ... {names[-1]})")
    print_trainable_parameters(model)
    pad = tok.pad_token_id
    lora_params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # I-LoRA: fast; O-LoRA: current task
    if args.method == "inscl":  # Replay with InsCL's distance-weighted budget and InsInfo sampling (inscl.py)
        from inscl import InsCLReplay
        replay = InsCLReplay(cfg, tok, pad, model)
    else:
        replay = Replay(cfg, tok, pad) if args.method in ("replay", "ilora") else None
    ewc = EWC(lora_params, cfg) if args.method == "ewc" else None
    ilora = ILoRA(model, replay, cfg) if args.method == "ilora" else None
    olora = args.method == "olora"
    load_adapter = load_olora if olora else load_lora  # O-LoRA's stack of earlier tasks is sized from the file
    evaluated = (lambda: lora_view(model, "slow")) if ilora else contextlib.nullcontext  # I-LoRA: the slow LoRA
    eval_sets = load_eval_sets(cfg, tok)
    bench, knowledge = load_bench(cfg), load_knowledge(cfg)

    stages = list(enumerate(cfg.tasks, 1))
    first_todo = next((s for s, t in stages if not is_done(stage_dir(cfg, method, s, t))), None)

    def recovery():  # every method recovers with plain CE on its trainable LoRA weights
        if ilora:  # the evaluated model is the slow LoRA: the probe trains a copy of it in the fast one
            copy_slow_to_fast(model)
        run_recovery(model, tok, cfg, method, device, eval_sets, knowledge,
                     param_groups_fn=lambda: get_lora_param_groups(model, cfg.lr, cfg.weight_decay))

    if first_todo is None:
        last = stage_dir(cfg, method, len(stages), cfg.tasks[-1])
        check_resume_config(last, cfg)
        print(f"[{method}] all {len(stages)} stages are done; pass --restart to train again")
        if needs_recovery(cfg, method):
            load_adapter(model, last / "adapter.safetensors")
            recovery()
        return
    global_step = 0
    if first_todo == 1:
        forget_method_rows(cfg, method, 0, train_logs)
        with evaluated():
            run_stage_eval(model, tok, cfg, method, 0, "base", 0, device, eval_sets, None, bench, knowledge)
    else:
        prev = stage_dir(cfg, method, first_todo - 1, cfg.tasks[first_todo - 2])
        check_resume_config(prev, cfg)
        load_adapter(model, prev / "adapter.safetensors")  # I-LoRA: fast and slow; O-LoRA: current and earlier
        global_step = read_done(prev)["step"]
        if replay:
            replay.end_of_task(list(cfg.tasks[:first_todo - 1]))  # deterministic: the same buffer as before
        if ewc:
            ewc.load_state(load_file(prev / "ewc_state.safetensors"), device)
        print(f"[{method}] resuming after stage {first_todo - 1} ({prev})")

    save_config(cfg, log_dir, name=f"config_{method}.json", extra={"method": method})  # the recipe of these logs
    timer = Timer()
    for stage, task in stages[first_todo - 1:]:
        forget_method_rows(cfg, method, stage, train_logs)
        set_seed(cfg.seed + stage)
        if olora and stage > 1:  # the last task's LoRA joins the frozen earlier ones; a fresh one for this task
            start_olora_task(model, seed=cfg.seed + stage)
        train_ds = load_task_dataset(cfg, tok, task, cfg.train_split)
        params = list(lora_params.values())
        opt = make_optimizer(get_lora_param_groups(model, cfg.lr, cfg.weight_decay))
        rows = replay.current_rows(stage) if replay else cfg.per_device_batch_size  # replay_mode mix: fewer
        total = steps_per_stage(cfg, len(train_ds), rows)
        sched = make_scheduler(opt, total, cfg.warmup_ratio)
        batches = infinite_batches(make_loader(train_ds, rows, pad, shuffle=True, seed=cfg.seed + stage))
        loss_fn = ilora.loss_fn if ilora else replay.loss_fn if replay else mean_token_loss
        logger = JsonlLogger(log_dir / f"seq_{method}_{task}_train_loss.jsonl")
        if args.method == "inscl":  # the buffer for this task: distances to the earlier tasks, allocation, InsInfo
            info = replay.start_of_task(task, list(cfg.tasks[:stage - 1]))
            logger.log({"method": method, "stage": stage, "task": task, "step": global_step, "split": "inscl", **info})
        print(f"[{method}] stage {stage}/{len(stages)} {task}: {len(train_ds)} rows, {total} steps")

        model.train()
        skipped_nan = skipped_empty = 0
        for step in (bar := tqdm_range(total, f"{method} {task}")):
            lr = sched.get_last_lr()[0]  # the lr this step uses
            st, grad_norm, terms = train_step(model, batches, cfg, device, loss_fn, params, opt, sched, args.method,
                                              ewc)
            skipped_nan, skipped_empty = skipped_nan + st["skipped_nan"], skipped_empty + st["skipped_empty"]
            if grad_norm is None:
                skipped_nan += st["micro"] > 0
                logger.log({"method": method, "stage": stage, "task": task, "step": global_step, "split": "skip",
                            "skipped_nan": skipped_nan, "skipped_empty": skipped_empty})
                continue
            global_step += 1
            rec = {"method": method, "stage": stage, "task": task, "step": global_step, "stage_step": step + 1,
                   "split": "train", "loss": round(st.get("task_loss", st["loss"]), 5), "lr": lr,
                   "grad_norm": round(grad_norm, 4), "time_s": timer(), **terms, **kept_tokens_field(st)}
            if "replay_loss" in st:  # "loss" stays the current task's, comparable across methods
                rec["replay_loss"], rec["objective"] = round(st["replay_loss"], 5), round(st["loss"], 5)
            if "consistency" in st:  # I-LoRA's MSE term, unweighted
                rec["consistency"] = round(st["consistency"], 6)
            logger.log(rec)
            bar.set_postfix(loss=rec["loss"])
            if global_step % cfg.log_interval == 0:
                print(f"[{method}] {task} step {step + 1}/{total} loss {rec['loss']:.4f}"
                      + (f" ewc {rec['ewc_penalty']:.3g}" if ewc else "")
                      + (f" consistency {rec['consistency']:.3g}" if "consistency" in rec else "")
                      + (f" orth {rec['olora_orth']:.3g}" if olora else "") + f" ({timer():.0f}s)")
                logger.flush()
        if skipped_nan or skipped_empty:
            print(f"[{method}] {task}: skipped {skipped_nan} non-finite and {skipped_empty} unsupervised batches")

        # end_of_task hooks, then save (adapter, plus EWC's Fisher/anchors so a resume can go on; I-LoRA's and O-LoRA's
        # frozen LoRAs are lora_ parameters, so adapter.safetensors holds them)
        if replay:
            replay.end_of_task(list(cfg.tasks[:stage]))
        ckpt = stage_dir(cfg, method, stage, task)
        if ewc:
            info = ewc.end_of_task(model, train_ds, device, pad, seed=cfg.seed + stage)
            logger.log({"method": method, "stage": stage, "task": task, "step": global_step, "split": "fisher", **info})
            print(f"[ewc] {task}: Fisher over {info['fisher_batches']} batches, mean {info['fisher_mean']:.3g}")
            atomic_save_safetensors(ewc.state(), str(ckpt / "ewc_state.safetensors"))
        logger.flush()
        save_lora(model, str(ckpt / "adapter.safetensors"))
        with evaluated():
            run_stage_eval(model, tok, cfg, method, stage, task, global_step, device, eval_sets, None, bench,
                           knowledge)
        mark_done(ckpt, cfg, {"method": method, "stage": stage, "task": task, "step": global_step,
                              "skipped_nan": skipped_nan, "skipped_empty": skipped_empty, "time_s": timer()})
    if cfg.recovery_probe:
        recovery()
    print(f"[{method}] done in {timer():.0f}s; logs in {log_dir}, adapters in {cfg.save_dir}/{method}")


def tqdm_range(n: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(range(n), desc=desc)


if __name__ == "__main__":
    main()
