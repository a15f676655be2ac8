"""summarize_seeds.py: CL metrics per seed from the JSONL logs, mean and std over seeds, unfinished runs left out."""
import json

import pytest

import summarize_seeds


def write_seed(root, seed, method, R, kl, done=True):
    d = root / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    tasks = ["T1_general", "T2_math"]
    rows = [{"method": method, "stage": s, "eval_task": t, "loss": R[s][i], "fast_mode": "current"}
            for s in range(len(R) if done else len(R) - 1) for i, t in enumerate(tasks)]
    with open(d / "seq_eval_loss.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(d / "seq_drift.jsonl", "a") as f:
        f.writelines(json.dumps({"method": method, "stage": s, "metric": "kl_base", "value": kl * s,
                                 "fast_mode": "current"}) + "\n" for s in range(3))


def test_mean_and_std_over_seeds_of_the_loss_metrics(tmp_path, capsys):
    write_seed(tmp_path, 1, "m", [[2.0, 2.0], [1.0, 2.0], [1.5, 1.0]], 0.1)
    write_seed(tmp_path, 2, "m", [[2.0, 2.0], [1.0, 2.0], [1.7, 1.0]], 0.3)
    write_seed(tmp_path, 3, "m", [[2.0, 2.0], [1.0, 2.0], [9.9, 9.9]], 0.3, done=False)  # unfinished: left out
    summarize_seeds.main(["--log_root", str(tmp_path)])
    per = json.loads((tmp_path / "seeds_summary.json").read_text())["m"]
    assert set(per) == {"seed1", "seed2"}
    # AP = mean final loss; BWT (loss) = -(R[2][0] - R[1][0]); forgetting = R[2][0] - min(R[0..1][0])
    assert per["seed1"]["ap_loss"] == pytest.approx(1.25) and per["seed2"]["ap_loss"] == pytest.approx(1.35)
    assert per["seed1"]["bwt_loss"] == pytest.approx(-0.5) and per["seed2"]["forgetting_loss"] == pytest.approx(0.7)
    assert per["seed2"]["kl_base_final"] == pytest.approx(0.6)
    out = capsys.readouterr().out
    assert "1.300 ± 0.071 (n=2)" in out  # AP: mean 1.3, sample std of (1.25, 1.35)
    write_seed(tmp_path, 1, "n", [[2.0, 2.0], [1.0, 2.0], [1.6, 1.1]], 0.1)  # final row 0.1 above m's: AP +0.1
    write_seed(tmp_path, 2, "n", [[2.0, 2.0], [1.0, 2.0], [1.8, 1.1]], 0.3)
    summarize_seeds.main(["--log_root", str(tmp_path), "--control", "m"])
    assert "| n − m | +0.1000 ± 0.0000 (n=2) |" in capsys.readouterr().out
