import sys, time
sys.path.insert(0, "/work/main")
from bench import harness as H

def prof(variant, recipe, steps, splits, tok):
    import torch
    from torch.profiler import profile, ProfilerActivity
    from depthtune.config import ModelConfig, TrainConfig, parse_variant
    from depthtune.variants import build_variant
    from depthtune.training import train
    torch.set_num_threads(2)
    spec = parse_variant(variant, H.VARIANTS[variant]["spec"], "v")
    b = build_variant(ModelConfig(), spec, 2)
    tr = H.subset(splits["sst2"]["train"], steps*16); va = H.subset(splits["sst2"]["val"], 16)
    cfg = TrainConfig(device="cpu", epochs=1, batch_size=16, lr=1e-4, checkpoint_every=0)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        t=time.perf_counter()
        train(model=b.model, spec=spec, num_layers=b.num_layers, train_ex=tr.ex, val_ex=va.ex, cfg=cfg, metric="accuracy", device="cpu", pad_id=0, num_labels=2, log=lambda s: None)
        wall=time.perf_counter()-t
    return f"wall {wall:.1f}\n" + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)

if __name__ == "__main__":
    from depthtune.config import ModelConfig
    from depthtune.sources import load_tokenizer
    tok = load_tokenizer(ModelConfig())
    tx, ty = H.read_sst2(H.SHARED_DATA/"sst2"/"train.tsv", 1024, 0)
    vx, vy = H.read_sst2(H.SHARED_DATA/"sst2"/"dev.tsv", 256, 1)
    splits = {"sst2": {"train": H.tokenize_split(tok, tx, ty), "val": H.tokenize_split(tok, vx, vy)}}
    r = H.run_isolated(prof, sys.argv[1], "depthtune", int(sys.argv[2]), splits, tok, timeout=900)
    print(r["value"] if r["ok"] else r)
