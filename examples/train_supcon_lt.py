"""Two-stage contrastive training on long-tailed data with ltcl_fused's nn.Module losses.

    python examples/train_supcon_lt.py                          # one process (CPU, or a GPU with bf16 autocast)
    torchrun --nproc_per_node 2 examples/train_supcon_lt.py     # two ranks (Gloo on CPU, NCCL on GPUs)
    python examples/train_supcon_lt.py --loss supcon --steps 300

Data: scikit-learn's bundled 8x8 digits made long-tailed (imbalance ratio 50: 120 training images of digit 0
down to 2 of digit 9) with a balanced test set; the split, the augmentation and the encoder come from
``ltcl_fused.demo``. Stage 1 trains encoder + projection head with a contrastive loss on two augmented
views: by default ``ltcl_fused.nn.ResComLoss`` (supervised contrast over the batch plus hard positives and
negatives mined from its class-balanced queue, weighted by effective-number class weights), or SupCon / AFCL
(``--loss``). Stage 2 trains a linear classifier on the frozen encoder features with a balanced softmax (the
logits shifted by the log class prior). On several ranks each rank takes its slice of every global batch,
the loss modules run with ``distributed=True`` (the loss of the global batch, exact gradients under DDP) and
the queue is filled with every rank's features.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import ltcl_fused as lf
from ltcl_fused.demo import N_CLASSES, Encoder, augment, load_long_tailed_digits


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loss", choices=["rescom", "supcon", "afcl"], default="rescom")
    ap.add_argument("--steps", type=int, default=400, help="stage-1 steps")
    ap.add_argument("--probe-steps", type=int, default=300, help="stage-2 (linear classifier) steps")
    ap.add_argument("--batch", type=int, default=128, help="global batch (samples; two views each)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--queue-size", type=int, default=8, help="ResCom: queue slots per class")
    ap.add_argument("--imbalance", type=float, default=50.0)
    ap.add_argument("--backend", default="auto", help="ltcl_fused backend of the losses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="save encoder, head and loss state (queue included) here")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def setup_distributed():
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        return dist.get_rank(), world, torch.device("cuda", local) if cuda else torch.device("cpu")
    return 0, 1, torch.device("cuda" if cuda else "cpu")


def make_loss(args, class_counts, feat_dim, distributed):
    common = dict(temperature=args.temperature, backend=args.backend, distributed=distributed)
    if args.loss == "supcon":
        return lf.nn.SupConLoss(**common)
    if args.loss == "afcl":
        return lf.nn.AFCLLoss(gamma=1.0, eta=10.0, **common)
    weights = lf.effective_number_weights(class_counts, beta=0.999)
    return lf.nn.ResComLoss(N_CLASSES, args.queue_size, feat_dim, k_pos=1, k_neg=2 * args.queue_size,
                            class_weights=weights, **common)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    torch.set_num_threads(1)  # the model is tiny: more threads only add synchronisation
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    x_tr, y_tr, x_te, y_te, counts = load_long_tailed_digits(args.imbalance)
    x_tr, y_tr, x_te, y_te = x_tr.to(device), y_tr.to(device), x_te.to(device), y_te.to(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the world size {world}")
    if rank == 0:
        print(f"long-tailed digits: {len(y_tr)} training images {counts}, {len(y_te)} test images; "
              f"{world} process(es) on {device}, loss {args.loss}")

    encoder = Encoder(256, 128).to(device)
    head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).to(device)
    model = nn.Sequential(encoder, head)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = make_loss(args, counts, 64, distributed=world > 1).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, args.steps))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    # ---- stage 1: contrastive pre-training on two augmented views ---------------------------------------
    g = torch.Generator().manual_seed(1000 + args.seed)  # the same global batches on every rank
    n, per_rank = len(y_tr), args.batch // world
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, desc="stage 1", dynamic_ncols=True, mininterval=0.5)
    model.train()
    loss_fn.train()
    loss = torch.zeros(())
    for step in range(args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        xb, yb = x_tr[idx.to(device)].cpu(), y_tr[idx.to(device)]
        views = torch.cat([augment(xb, g), augment(xb, g)]).to(device)   # [2b, 64]: view 0, then view 1
        with autocast:
            z = model(views)
        z = F.normalize(z.float(), dim=1).view(2, per_rank, -1).transpose(0, 1)  # [b, 2, d]
        loss = loss_fn(z, yb)                    # this rank's slice; the loss of the global batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    if bar is not None:
        bar.close()
    checksum = sum(float(p.detach().double().sum()) for p in encoder.parameters())
    sys.stdout.write(f"rank {rank}/{world}: final stage-1 loss {loss.item():.6f}, "
                     f"parameter checksum {checksum:.6f}\n")  # one write: ranks share the terminal
    sys.stdout.flush()

    # ---- stage 2: linear classifier on the frozen encoder (balanced softmax: logits + log prior) -------
    encoder.eval()
    with torch.no_grad():
        f_tr, f_te = encoder(x_tr), encoder(x_te)
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float32, device=device) / sum(counts))
    clf = nn.Linear(128, N_CLASSES).to(device)
    opt2 = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(args.probe_steps):  # identical on every rank (same features, same initial weights)
        opt2.zero_grad(set_to_none=True)
        F.cross_entropy(clf(f_tr) + log_prior, y_tr).backward()
        opt2.step()
    with torch.no_grad():
        pred = clf(f_te).argmax(1)
    per_class = [float((pred[y_te == c] == c).float().mean()) for c in range(N_CLASSES)]
    if rank == 0:
        print(f"balanced test accuracy {100 * sum(per_class) / N_CLASSES:.1f} %; per class "
              + " ".join(f"{100 * a:.0f}" for a in per_class))
        if args.save:
            torch.save({"encoder": encoder.state_dict(), "head": head.state_dict(), "classifier": clf.state_dict(),
                        "loss": loss_fn.state_dict()}, args.save)
            print(f"saved {args.save}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
