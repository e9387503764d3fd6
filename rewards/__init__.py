"""Rule-based rewards (DeepSeek-R1 §2.2.2, §2.3.2) and the sandbox for model-written code.

Pure: nothing here imports Ray or any other r1lab package.
"""

from rewards.types import RewardResult, RewardStatus

__all__ = ["RewardResult", "RewardStatus"]
