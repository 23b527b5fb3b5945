"""The TR-DPO math: pure torch, importable without Ray, MLflow or transformers.

TR-DPO (Gorbatovski et al., "Learn Your Reference Model for Real Good Alignment", arXiv 2404.09656)
is DPO whose reference policy moves: every ``tau`` optimizer steps it is pulled towards the policy,

    soft:  ref <- alpha * policy + (1 - alpha) * ref
    hard:  ref <- policy
    none:  ref stays the initial model (vanilla DPO)

The three pieces here are small stateless functions over tensors:

* :func:`sequence_logprobs` - log p(response | prompt) per sequence, prompt and padding masked;
* :func:`token_kl` - exact per-position KL between two models' next-token distributions;
* :func:`dpo_loss` / :func:`ipo_loss` - the preference losses and the implicit rewards;
* :class:`ReferenceUpdater` - when and how the reference moves, applied in place to lists of
  tensors with ``torch._foreach_*`` so that the same call serves full weights or local FSDP shards;
* :func:`lowrank_soft_update_` - the same soft rule for LoRA adapters, in weight space (stacked
  factors recompressed into a fixed rank, with :class:`LowRankErrorBound` saying how exact it is).
"""

from trainers.trdpo.logprobs import IGNORE_INDEX, sequence_logprobs, token_kl
from trainers.trdpo.losses import PreferenceLogps, PreferenceLoss, dpo_loss, ipo_loss, preference_loss
from trainers.trdpo.lowrank import LowRankErrorBound, LowRankUpdate, lowrank_hard_update_, lowrank_soft_update_
from trainers.trdpo.ref_update import RefUpdateMode, ReferenceUpdater, hard_update_, soft_update_

__all__ = [
    "IGNORE_INDEX",
    "LowRankErrorBound",
    "LowRankUpdate",
    "PreferenceLogps",
    "PreferenceLoss",
    "RefUpdateMode",
    "ReferenceUpdater",
    "dpo_loss",
    "hard_update_",
    "ipo_loss",
    "lowrank_hard_update_",
    "lowrank_soft_update_",
    "preference_loss",
    "sequence_logprobs",
    "soft_update_",
    "token_kl",
]
