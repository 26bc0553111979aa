"""Constitutional AI: critique → revision → SFT (stage 1) and RLAIF (stage 2)."""
