import sys, time, cProfile, pstats, io
sys.path.insert(0, "/work/main")
from bench import harness as H

def cprof(job, splits, tok):
    pr = cProfile.Profile()
    pr.enable()
    r = H.run_job(job, splits, tok)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats(sys.argv[2] if len(sys.argv)>2 else "cumulative").print_stats(70)
    return r["train_s"], s.getvalue()

if __name__ == "__main__":
    from depthtune.config import ModelConfig
    from depthtune.sources import load_tokenizer
    tok = load_tokenizer(ModelConfig())
    tx, ty = H.read_sst2(H.SHARED_DATA/"sst2"/"train.tsv", 1024, 0)
    vx, vy = H.read_sst2(H.SHARED_DATA/"sst2"/"dev.tsv", 256, 1)
    splits = {"sst2": {"train": H.tokenize_split(tok, tx, ty), "val": H.tokenize_split(tok, vx, vy)}}
    recipe = sys.argv[1]
    job = H.job_spec(recipe=recipe, variant="full", data="sst2", epochs=1, n_train=16*16, n_val=16, batch_size=16,
                     lr=1e-4, eval_every=0, target=None, threads=2, seed=0)
    r = H.run_isolated(cprof, job, splits, tok)
    print(r["value"][0]); print(r["value"][1][:12000] if r["ok"] else r)
