"""fusedad under DDP, FSDP2, tensor parallel or sequence parallel: a few AdamW steps of a 2-layer MLP.

    torchrun --nproc_per_node 2 examples/distributed.py --mode ddp     # or fsdp2, tp, sp
    torchrun --nproc_per_node 1 examples/distributed.py --mode ddp     # one process: the reference

Every rank builds the same model and draws the same global batch (fixed seeds); data parallel modes
take their rows of it, sp its part of the sequence, tp all of it. Every mode therefore prints the same
losses as one process, up to rounding. CUDA: nccl, one GPU per process. CPU: gloo, and the kernels run
through Triton's interpreter when TRITON_INTERPRET=1 is set (else fusedad's eager path).
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fusedad

BATCH, SEQ, DIM, HIDDEN = 4, 8, 32, 64


def build(mode, device, world):
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = nn.Sequential(fusedad.nn.Linear(DIM, HIDDEN, activation="gelu"), fusedad.nn.Linear(HIDDEN, DIM))
    model.to(device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        return fully_shard(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh(device.type, (world,))
    if mode == "tp":  # every rank: the whole batch; weights split by output (0) and input (1) features
        plan = {"0": ColwiseParallel(), "1": RowwiseParallel()}
    else:  # sp: inputs and outputs split along the sequence (dim 1), gathered for the layers
        plan = {"0": ColwiseParallel(input_layouts=Shard(1)), "1": RowwiseParallel(output_layouts=Shard(1))}
    return parallelize_module(model, mesh, plan)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "tp", "sp"], required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = build(args.mode, device, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    if args.mode in ("ddp", "fsdp2"):
        part = (slice(rank * BATCH // world, (rank + 1) * BATCH // world),)  # this rank's rows
    elif args.mode == "sp":
        part = (slice(None), slice(rank * SEQ // world, (rank + 1) * SEQ // world))  # its part of the sequence
    else:
        part = ()
    losses = []
    for step in range(args.steps):
        torch.manual_seed(1000 + step)  # the same global batch on every rank
        x, target = torch.randn(BATCH, SEQ, DIM, device=device), torch.randn(BATCH, SEQ, DIM, device=device)
        loss = F.mse_loss(model(x[part]), target[part])  # the mean over this rank's part
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if args.mode != "tp":  # equal parts: the global mean is the mean of the ranks' means
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    if rank == 0:
        print(f"{args.mode} on {world} process(es), fusedad backend {fusedad.backend(device)}: losses "
              + " ".join(f"{v:.6f}" for v in losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
