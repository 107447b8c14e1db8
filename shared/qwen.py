"""The one module that imports `qwen_tts`: loading the codec and the TTS model from a directory.

Everything else in the project goes through these functions, so a change of upstream API is a
change here only. The same code loads the released checkpoints and the tiny ones `shared.tiny` writes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from shared.quiet import quiet_fds

# qwen_tts prints a flash-attn banner and its `sox` dependency shells out to a missing binary at import time;
# neither matters to the 12 Hz path, so keep them out of every log.
with quiet_fds():
    import qwen_tts  # noqa: F401

from qwen_tts import Qwen3TTSModel, Qwen3TTSTokenizer
from qwen_tts.core.models.configuration_qwen3_tts import (
    Qwen3TTSConfig,
    Qwen3TTSSpeakerEncoderConfig,
    Qwen3TTSTalkerCodePredictorConfig,
    Qwen3TTSTalkerConfig,
)
from qwen_tts.core.models.modeling_qwen3_tts import (
    Qwen3TTSForConditionalGeneration,
    Qwen3TTSSpeakerEncoder,
    mel_spectrogram,
)
from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
    Qwen3TTSTokenizerV2Config,
    Qwen3TTSTokenizerV2DecoderConfig,
)
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model

from shared.audio import CODEC_SAMPLE_RATE, SAMPLES_PER_FRAME, pad_to_frame

__all__ = [
    "Qwen3TTSConfig", "Qwen3TTSTalkerConfig", "Qwen3TTSTalkerCodePredictorConfig", "Qwen3TTSSpeakerEncoderConfig",
    "Qwen3TTSForConditionalGeneration", "Qwen3TTSModel", "Qwen3TTSTokenizer", "Qwen3TTSTokenizerV2Config",
    "Qwen3TTSTokenizerV2DecoderConfig", "Qwen3TTSTokenizerV2Model", "mel_spectrogram",
    "load_codec", "encode_clips", "kept_codes", "reference_encode", "load_tts_model", "load_inference_model",
    "speaker_mel", "SPEAKER_MEL", "save_model_dir", "place_inference_model", "load_speaker_encoder",
]


def _check_dir(path: str | Path, what: str) -> str:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} directory {p} has no config.json; point it at a downloaded checkpoint "
                                f"(or one written by `python -m shared.tiny --output DIR`)")
    return str(p)


def load_codec(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Qwen3TTSTokenizer:
    """Load Qwen3-TTS-Tokenizer-12Hz (released or tiny) in eval mode on `device`."""
    codec = Qwen3TTSTokenizer.from_pretrained(_check_dir(path, "codec"), device_map=str(device), dtype=dtype)
    codec.model.eval()
    if codec.get_input_sample_rate() != CODEC_SAMPLE_RATE or codec.get_encode_downsample_rate() != SAMPLES_PER_FRAME:
        raise ValueError(f"{path} is not a 12 Hz codec (input rate {codec.get_input_sample_rate()}, "
                         f"downsample {codec.get_encode_downsample_rate()}); use Qwen3-TTS-Tokenizer-12Hz")
    return codec


@torch.inference_mode()
def encode_clips(codec: Qwen3TTSTokenizer, clips: list[np.ndarray], exact_tail: bool = False) -> list[np.ndarray]:
    """Encode 24 kHz mono clips; returns (frames, 16) int16 codes per clip.

    Default: each clip is zero-padded to a whole number of frames and the clips are encoded in one
    batch, so a clip's codes never depend on what it is batched with. Those codes equal
    `Qwen3TTSTokenizer.encode` of the frame-padded clip exactly, and of the unpadded clip on every
    frame but a partial last one. `exact_tail=True` encodes each clip whose length is not a whole
    number of frames on its own, unpadded, reproducing one-at-a-time upstream codes bit for bit at
    the cost of batching (see docs/preparing-data.md, "Last partial frame").
    """
    results: list[np.ndarray | None] = [None] * len(clips)
    batched = []
    for i, clip in enumerate(clips):
        if exact_tail and len(clip) % SAMPLES_PER_FRAME:
            results[i] = _encode_padded(codec.model, [clip], [len(clip)])[0]
        else:
            batched.append(i)
    if batched:
        padded = [pad_to_frame(clips[i]) for i in batched]
        for i, codes in zip(batched, _encode_padded(codec.model, padded, [len(clips[i]) for i in batched])):
            results[i] = codes
    return results


def _encode_padded(model: Qwen3TTSTokenizerV2Model, clips: list[np.ndarray], lengths: list[int]) -> list[np.ndarray]:
    longest = max(len(c) for c in clips)
    batch = np.zeros((len(clips), longest), dtype=np.float32)
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    param = next(model.parameters())
    values = torch.from_numpy(batch).to(param.device, non_blocking=True).to(param.dtype)
    codes = kept_codes(model, values)  # (B, Q, T)
    codes = codes.transpose(1, 2).to(torch.int16).cpu().numpy()
    return [codes[i, : -(-n // SAMPLES_PER_FRAME)] for i, n in enumerate(lengths)]


def kept_codes(model: Qwen3TTSTokenizerV2Model, values: torch.Tensor) -> torch.Tensor:
    """(B, 16, T) codes of (B, samples) audio: only the quantizers whose codes are kept are run.

    The codec's encoder holds 32 residual quantizers and the model uses the first 16. Each residual stage
    quantizes what the stages before it left, so stopping after 16 gives exactly the first 16 codes of a full
    run at about half the quantizer cost (upstream's Qwen3TTSTokenizer.encode runs all 32 and slices).
    """
    kept = model.encoder_valid_num_quantizers
    encoded = model.encoder.encode(input_values=values.unsqueeze(1), num_quantizers=kept, return_dict=True)
    return encoded.audio_codes[:, :kept]


def reference_encode(codec: Qwen3TTSTokenizer, audios: list, sr: int | None = None) -> list[np.ndarray]:
    """The upstream path: `Qwen3TTSTokenizer.encode` as the reference flow calls it. (frames, 16) int64 each."""
    out = codec.encode(audios, sr=sr)
    return [c.cpu().numpy().astype(np.int64) for c in out.audio_codes]


def load_tts_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "eager") -> Qwen3TTSForConditionalGeneration:
    """The bare `Qwen3TTSForConditionalGeneration` (what training wraps with FSDP2)."""
    flex = attn_implementation == "flex_attention"
    model = Qwen3TTSForConditionalGeneration.from_pretrained(
        _check_dir(path, "model"), dtype=dtype, attn_implementation="sdpa" if flex else attn_implementation)
    if flex:
        set_talker_attention(model, "flex_attention")
    return model.to(device)


def set_talker_attention(model: Qwen3TTSForConditionalGeneration, implementation: str) -> None:
    """Switch the talker's layers to `implementation`; the code predictor keeps sdpa. Upstream declares flex support
    on the talker's text model only (not on the top-level class or the code predictor, so flex cannot be asked
    for at load time), and the code predictor's 16-position causal sequences are never packed."""
    model.talker.model.set_attn_implementation({"": implementation, "code_predictor_config": "sdpa"})


def load_inference_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         attn_implementation: str = "eager") -> Qwen3TTSModel:
    """The user-facing wrapper with generate_voice_clone / generate_custom_voice."""
    tts = Qwen3TTSModel.from_pretrained(_check_dir(path, "model"), device_map=str(device), dtype=dtype,
                                        attn_implementation=attn_implementation)
    # The talker's generate names no pad token, so transformers warns on every call that it takes the eos
    # token: name it here, the same one, and the log keeps one line per thing worth reading.
    generation = tts.model.talker.generation_config
    if generation.pad_token_id is None:
        generation.pad_token_id = tts.model.config.talker_config.codec_eos_token_id
    return tts


def load_speaker_encoder(path: str | Path, dtype: torch.dtype = torch.float32) -> Qwen3TTSSpeakerEncoder:
    """Only the speaker encoder of a Base model directory (its `speaker_encoder.*` tensors; a few MB of a
    multi-GB checkpoint), in eval mode on the CPU: the x-vectors for a model that has none (CustomVoice)."""
    import json

    from safetensors import safe_open

    path = Path(_check_dir(path, "model"))
    config = Qwen3TTSConfig.from_pretrained(str(path))
    encoder = Qwen3TTSSpeakerEncoder(config.speaker_encoder_config)
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    prefix, state = "speaker_encoder.", {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            state |= {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    encoder.load_state_dict(state)
    return encoder.to(dtype).eval()


# The log-mel the speaker encoder reads (the settings of Qwen3TTSForConditionalGeneration.extract_speaker_embedding).
SPEAKER_MEL = dict(n_fft=1024, num_mels=128, sampling_rate=CODEC_SAMPLE_RATE, hop_size=256, win_size=1024, fmin=0,
                   fmax=12000)


def speaker_mel(samples_24k: np.ndarray) -> torch.Tensor:
    """(frames, 128) float32 log-mel of 24 kHz mono audio, as the speaker encoder expects it."""
    wav = torch.from_numpy(np.ascontiguousarray(samples_24k, dtype=np.float32)).unsqueeze(0)
    return mel_spectrogram(wav, **SPEAKER_MEL)[0].transpose(0, 1).contiguous()


def save_model_dir(model: Qwen3TTSForConditionalGeneration, out: str | Path, state_dict: dict | None = None) -> None:
    """Write config.json + model.safetensors that Qwen3TTSForConditionalGeneration.from_pretrained reloads.

    Not save_pretrained: its diff-against-defaults config writer fails on a reloaded model's sub-configs, and
    the speaker-encoder config's __init__ takes no **kwargs, so only its own keys may be written (the saved
    form would carry `model_type`, `dtype`, ... and fail to reload).
    """
    import inspect
    import json

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    accepted = set(inspect.signature(Qwen3TTSSpeakerEncoderConfig.__init__).parameters) - {"self"}
    config["speaker_encoder_config"] = {k: v for k, v in config.get("speaker_encoder_config", {}).items()
                                        if k in accepted}
    config["architectures"] = [type(model).__name__]
    _drop_local_paths(config)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tensors = state_dict if state_dict is not None else model.state_dict()
    weights = out / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    # safetensors creates its file 0600 whatever the umask; a model directory is meant to be served or shared,
    # so the weights take the mode every other file here got from the umask (config.json's).
    os.chmod(weights, (out / "config.json").stat().st_mode & 0o777)


def _drop_local_paths(config: dict) -> None:
    """`_name_or_path` records the directory the model was loaded from: a written model must not carry it."""
    for key, value in config.items():
        if key == "_name_or_path":
            config[key] = ""
        elif isinstance(value, dict):
            _drop_local_paths(value)


def place_inference_model(tts: Qwen3TTSModel, device: torch.device | str) -> None:
    """Move a loaded Qwen3TTSModel (talker, speaker encoder and its codec) to `device`. The wrapper and the codec
    each record the device they were loaded on and place their inputs there, so those records move too."""
    device = torch.device(device)
    tts.model.to(device)
    tts.device = device
    codec = tts.model.speech_tokenizer
    if codec is not None:
        codec.model.to(device)
        codec.device = device
