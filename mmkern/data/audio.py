"""Audio preprocessing: waveforms framed into log spectrograms with torch alone."""

import math

import torch


def frame_count(samples: int, frame_length: int, hop_length: int) -> int:
    """How many frames ``log_spectrogram`` makes of ``samples`` samples (0 for a clip shorter than a frame)."""
    return 0 if samples < frame_length else 1 + (samples - frame_length) // hop_length


def log_spectrogram(
    waveforms: torch.Tensor, sample_rate: int, frame_ms: float = 25.0, hop_ms: float = 10.0, floor: float = 1e-10
) -> torch.Tensor:
    """``log(|STFT|^2 + floor)`` of Hann-windowed frames: ``(..., frames, frame_length // 2 + 1)``
    float32 for waveforms ``(..., samples)``. Frames start every ``hop_ms`` and do not run past the
    end (no padding), so a clip's frame count is ``frame_count(samples, frame, hop)``: the length
    to pass on to attention."""
    if not isinstance(waveforms, torch.Tensor) or waveforms.dim() < 1 or not waveforms.is_floating_point():
        raise TypeError("waveforms must be a floating-point tensor (..., samples)")
    frame_length = int(round(sample_rate * frame_ms / 1000))
    hop_length = int(round(sample_rate * hop_ms / 1000))
    if frame_length < 2 or hop_length < 1:
        raise ValueError(
            f"frame_ms and hop_ms give frames of {frame_length} and hops of {hop_length} samples "
            f"at {sample_rate} Hz; need at least 2 and 1"
        )
    x = waveforms.float()
    if x.shape[-1] < frame_length or x.numel() == 0:
        # No whole frame (MKL's FFT refuses an empty batch).
        return x.new_zeros(*x.shape[:-1], 0, frame_length // 2 + 1)
    frames = x.unfold(-1, frame_length, hop_length)
    window = torch.hann_window(frame_length, periodic=True, device=x.device)
    power = torch.fft.rfft(frames * window, dim=-1).abs().square()
    return torch.log(power + floor)


# The keypad's row and column frequencies (ITU-T Q.23): each key sounds one of each.
DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
DTMF_COLUMNS = (1209.0, 1336.0, 1477.0)
DTMF_KEYS = "123456789*0#"


def dtmf_tone(
    key: str,
    sample_rate: int = 8000,
    duration: float = 0.1,
    generator: torch.Generator | None = None,
    noise: float = 0.0,
) -> torch.Tensor:
    """The telephone tone of ``key`` (``0``-``9``, ``*``, ``#``): ``(samples,)`` float32, the sum of
    its row and column sines at a random phase (from ``generator``), plus Gaussian noise of standard
    deviation ``noise``."""
    if key not in DTMF_KEYS or len(key) != 1:
        raise ValueError(f"key must be one of {DTMF_KEYS!r}, got {key!r}")
    row, column = divmod(DTMF_KEYS.index(key), 3)
    t = torch.arange(int(round(sample_rate * duration)), dtype=torch.float64) / sample_rate
    phases = torch.rand(2, generator=generator, dtype=torch.float64) * 2 * math.pi
    tone = 0.5 * (
        torch.sin(2 * math.pi * DTMF_ROWS[row] * t + phases[0])
        + torch.sin(2 * math.pi * DTMF_COLUMNS[column] * t + phases[1])
    )
    if noise > 0:
        tone = tone + noise * torch.randn(t.shape, generator=generator, dtype=torch.float64)
    return tone.float()
