"""Every run config builds, is lockable, and fine-tuning models load pre-training checkpoints' shapes."""
import jax
import pytest

from clover_jax.convert.common import flatten
from clover_jax.models.clover import abstract_params
from clover_jax.train import load_config_file, model_config_from

FILES = ["configs/pretrain.py", "configs/pretrain.py:tiny", "configs/pretrain.py:base",
         "configs/qa_synthetic.py:open", "configs/qa_synthetic.py:mc",
         "configs/finetune_retrieval.py:msrvtt", "configs/finetune_retrieval.py:didemo",
         "configs/finetune_retrieval.py:lsmdc", "configs/finetune_retrieval.py:demo"]


@pytest.mark.parametrize("spec", FILES)
def test_config_builds_and_locks(spec):
    config = load_config_file(spec)
    config.lock()
    with pytest.raises(AttributeError):
        config.optim.lrr = 1.0
    model_config_from(config)  # valid model fields and values


@pytest.mark.parametrize("variant", ["msrvtt", "didemo", "lsmdc"])
def test_retrieval_finetuning_accepts_the_base_pretraining_params(variant):
    """init_from needs identical parameter shapes: 12-frame fine-tuning keeps the 8-frame fusion tables."""
    shapes = lambda spec: {k: v.shape for k, v in flatten(abstract_params(  # noqa: E731
        model_config_from(load_config_file(spec)))).items()}
    assert shapes(f"configs/finetune_retrieval.py:{variant}") == shapes("configs/pretrain.py:base")


def test_bad_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid"):
        load_config_file("configs/finetune_retrieval.py:msvd")
