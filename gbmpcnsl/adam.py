"""Adam as tf.keras 2 (the paper's) ran it: one fused TensorFlow kernel per variable."""

from __future__ import annotations

import types


def use_fused_adam_kernel(optimizer) -> bool:
    """Make a Keras Adam update each variable with TensorFlow's fused ResourceApplyAdam
    kernel (tf.keras 2's, so the paper's) instead of Keras 3's dozen element-wise ops per
    variable: the same update to float32 rounding, with a third fewer ops in the train step
    (EfficientNetB0: 16,433 -> 11,321), so TensorFlow traces it faster. The
    optimizer stays keras.optimizers.Adam (class and config), so checkpoints load anywhere.
    Returns whether it was applied (not to AMSGrad, another optimizer or another backend)."""
    import keras

    inner = getattr(optimizer, "inner_optimizer", optimizer)  # mixed precision's LossScaleOptimizer
    if keras.backend.backend() != "tensorflow" or type(inner) is not keras.optimizers.Adam or inner.amsgrad:
        return False
    inner.update_step = types.MethodType(_fused_adam_update_step, inner)
    return True


def _fused_adam_update_step(self, gradient, variable, learning_rate):
    """keras.optimizers.Adam.update_step in one op: m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2),
    variable -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + epsilon)."""
    import tensorflow as tf

    dtype = variable.dtype
    step = tf.cast(self.iterations + 1, dtype)
    index = self._get_variable_index(variable)
    beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle,
        m=self._momentums[index].value.handle,
        v=self._velocities[index].value.handle,
        beta1_power=tf.pow(beta_1, step),
        beta2_power=tf.pow(beta_2, step),
        lr=tf.cast(learning_rate, dtype),
        beta1=beta_1,
        beta2=beta_2,
        epsilon=tf.cast(self.epsilon, dtype),
        grad=tf.cast(gradient, dtype),
    )
