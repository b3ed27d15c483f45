"""posttrain: turn a base language model into an assistant and measure what each step did."""

__version__ = "0.1.0"
