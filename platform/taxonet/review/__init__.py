"""The review loop: crops serving was unsure about, reviewed by experts, labels that feed the next dataset."""
