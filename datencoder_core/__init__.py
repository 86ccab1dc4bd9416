"""DATEncoder core: pure PyTorch. Imports neither ComfyUI nor diffusers.

Paper: Arar et al., "Domain-Agnostic Tuning-Encoder for Fast Personalization of Text-To-Image Models".
"""

from .attention import DualPathAttnProcessor, DualPathState, Region, dual_path_attention
from .checkpoint import holds, load_encoder, save_encoder
from .concept import Concept
from .config import WORD_START_TUNING, EncoderConfig, LoRAConfig, LossConfig, TuningConfig
from .encoder import DATEncoder, EncoderOutput
from .errors import DATEncoderError
from .forward import EncoderForward, concept_noise_prediction, encoder_forward
from .lora import LoRAFactors, LoRASum
from .losses import diffusion_loss, embedding_l2_loss, nearest_neighbor_contrastive_loss
from .sites import LoRASite, architecture_fingerprint, discover_sites
from .tuning import personalize, personalize_from_word, tune, word_start
from .vocab import nearest_tokens

__all__ = [
    "Concept", "DATEncoder", "DATEncoderError", "DualPathAttnProcessor", "DualPathState", "EncoderConfig",
    "EncoderForward", "EncoderOutput", "LoRAConfig", "LoRAFactors", "LoRASite", "LoRASum", "LossConfig", "Region",
    "TuningConfig", "WORD_START_TUNING", "architecture_fingerprint", "concept_noise_prediction", "diffusion_loss", "discover_sites",
    "dual_path_attention", "embedding_l2_loss", "encoder_forward", "holds", "load_encoder",
    "nearest_neighbor_contrastive_loss", "nearest_tokens", "personalize", "personalize_from_word", "save_encoder",
    "tune", "word_start",
]
