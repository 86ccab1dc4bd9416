"""Models for offline work: loading the user's files (``loading``, with the SD1.5 ``configs/``) and the
diffusers reference stack with its tiny random builds (``reference``)."""
