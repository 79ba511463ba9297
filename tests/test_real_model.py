"""Slow: the real embedded MiniLM-L6 on real Rotten Tomatoes snippets (1-2 minutes each on 2 cores)."""
import pytest

from conftest import compose_config
from lora_lab import records
from lora_lab.train import run_training

REAL = ["logger=disabled", "data.max_train=2000", "data.max_eval=400", "data.max_length=64", "trainer.epochs=1",
        "trainer.progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_real_model_beats_majority_class(tmp_path, method):
    cfg = compose_config(*REAL, f"method={method}")
    record = run_training(cfg, tmp_path)
    majority = record["majority_class_test_accuracy"]
    assert record["best"]["test/accuracy"] > majority + 0.05, (record["best"], majority)
    assert record["parameters"]["total"] > 22_000_000
    if method == "lora":  # 6 layers x (q, v) x 2 x 384 x 8 plus the pooler and classifier
        assert record["parameters"]["trainable_method"] == 6 * 2 * 2 * 384 * 8
        assert len(records.load_delta_weights(tmp_path / records.DELTA_FILE)) == 12
        assert 0.5 < record["measurements"]["merged_over_unmerged"] < 1.5
