"""The compact-vocabulary training trick must give the exported full-vocabulary model the same loss."""

import numpy as np
import torch

from compute_service.model import GPT, GPTConfig
from models.compact_vocab import CompactVocab
from models.train import windowed_loss


def _tiny(vocab_size: int, seed: int) -> GPT:
    model = GPT(GPTConfig(context_length=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16))
    model.init_weights(seed)
    with torch.no_grad():  # make the `other` row and the used rows differ clearly from init
        model.transformer.wte.weight.mul_(20)
    return model.eval()


def test_expanded_model_has_the_compact_models_loss_on_used_and_unused_ids():
    rng = np.random.default_rng(0)
    full_vocab = 300
    used = rng.choice(full_vocab, size=90, replace=False)
    vocab = CompactVocab(np.concatenate([used, used]), full_vocab)  # duplicates collapse
    assert vocab.size == 91 and vocab.num_other == 210
    compact = _tiny(vocab.size, seed=1)
    full = vocab.expand(compact).eval()
    # text mostly from used ids, with some unused ones (as the validation text has)
    text = rng.choice(used, size=200)
    unused = np.setdiff1d(np.arange(full_vocab), used)
    text[::7] = rng.choice(unused, size=len(text[::7]))
    compact_loss = windowed_loss(compact, vocab.to_compact(text), 32, offset=vocab.logit_offset())
    full_loss = windowed_loss(full, text, 32)
    assert abs(compact_loss - full_loss) < 1e-4, (compact_loss, full_loss)
    # without the offset the compact loss is a different (wrong) number: the check can fail
    assert abs(windowed_loss(compact, vocab.to_compact(text), 32) - full_loss) > 0.1


def test_expanded_embedding_rows():
    vocab = CompactVocab(np.array([5, 2, 9]), 12)
    compact = _tiny(vocab.size, seed=2)
    full = vocab.expand(compact)
    wte = full.transformer.wte.weight
    assert full.lm_head.weight is wte  # still tied
    assert torch.equal(wte[[2, 5, 9]], compact.transformer.wte.weight[:3])
    for other in (0, 1, 3, 11):
        assert torch.equal(wte[other], compact.transformer.wte.weight[3])


def test_a_vocabulary_with_every_id_used_is_the_full_model():
    vocab = CompactVocab(np.arange(12), 12)
    assert vocab.size == 12 and vocab.num_other == 0 and vocab.logit_offset() is None
    compact = _tiny(vocab.size, seed=3)
    full = vocab.expand(compact)
    assert torch.equal(full.transformer.wte.weight, compact.transformer.wte.weight)
