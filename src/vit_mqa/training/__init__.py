"""Training: ``train()``, its set-up, steps, optimizer, distillation and processes."""
