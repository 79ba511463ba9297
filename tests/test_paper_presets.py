"""The LoRA paper's Tables 2 and 3 as presets: every row composes, dry-runs, and has the paper's size.

The rows' trainable counts come from each method's formula on models of RoBERTa-base, RoBERTa-large and
GPT-2 medium shapes built on the meta device (no weights, no download)."""
import pytest
import torch
from conftest import CONF, compose_config
from test_sweeps import expand

from lora_lab.methods import build_method

# row -> (trainable count without the classifier head, the paper's size in millions)
ROWS = {
    "t2_ft": (124_055_040, 125.0), "t2_bitfit": (102_144, 0.1), "t2_adapter_d_0.3m": (306_628, 0.3),
    "t2_adapter_d_0.9m": (909_132, 0.9), "t2_lora": (294_912, 0.3),
    "t2l_ft": (354_310_144, 355.0), "t2l_pfeiffer_3m": (3_171_840, 3.0), "t2l_pfeiffer_0.8m": (811_392, 0.8),
    "t2l_houlsby_6m": (6_444_032, 6.0), "t2l_houlsby_0.8m": (837_968, 0.8), "t2l_lora": (786_432, 0.8),
    "t3_ft": (354_823_168, 354.92), "t3_adapter_l_0.37m": (368_784, 0.37), "t3_adapter_l_11m": (11_089_152, 11.09),
    "t3_adapter_h_11m": (11_066_576, 11.09), "t3_top2": (25_192_448, 25.19), "t3_prelayer": (344_064, 0.35),
    "t3_lora": (393_216, 0.35),
}


@pytest.fixture(scope="module")
def shapes():
    from transformers import GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForSequenceClassification

    roberta = {"vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1, "num_labels": 2}
    with torch.device("meta"):
        return {
            "t2": RobertaForSequenceClassification(RobertaConfig(**roberta)),
            "t2l": RobertaForSequenceClassification(RobertaConfig(hidden_size=1024, num_hidden_layers=24,
                                                                  num_attention_heads=16, intermediate_size=4096,
                                                                  **roberta)),
            "t3": GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
        }


def test_every_paper_row_has_a_test_and_every_preset_lists_its_rows():
    assert set(ROWS) == {p.stem for p in (CONF / "arm" / "paper").glob("*.yaml")}
    for experiment, prefix, jobs in (("paper_table2", "t2_", 5 * 8 * 5), ("paper_table2_large", "t2l_", 6 * 8 * 5),
                                     ("paper_table3", "t3_", 7 * 3)):
        grid = expand(f"experiment={experiment}")
        assert len(grid) == jobs
        rows = {o.split("=", 1)[1] for job in grid for o in job if o.startswith("arm=")}
        assert rows == {f"paper/{r}" for r in ROWS if r.startswith(prefix)}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_paper_row_counts(row, shapes):
    table = row.split("_", 1)[0]
    model = shapes[table]
    overrides = ["method.reparameterize=false"] if row == "t3_prelayer" else []  # the saved prefixes, MLP folded
    method = build_method(compose_config(f"arm=paper/{row}", *overrides).method)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    count, paper_millions = ROWS[row]
    assert method.expected_trainable(model) - head == count
    assert abs(count / 1e6 - paper_millions) / paper_millions < 0.15  # the paper's rounded size


def test_a_paper_row_sets_its_own_learning_rate_over_the_tasks():
    lora = compose_config("task=mnli", "arm=paper/t2_lora", "model=roberta_base")
    full = compose_config("task=mnli", "arm=paper/t2_ft", "model=roberta_base")
    assert lora.trainer.lr == 5e-4 and lora.trainer.epochs == 30  # the paper's Table 9 for MNLI
    assert full.trainer.lr == 2e-5 and full.trainer.epochs == 10  # the RoBERTa paper's GLUE recipe
