"""The HMM language-model example: Brown data and split, Kneser-Ney baselines, HMM models."""
