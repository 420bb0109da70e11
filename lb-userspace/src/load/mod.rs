//! Load-driven weights: the control law that levels the backends' utilisation.
//! `law` is pure (time is passed in), so it is tested against a simulated plant.

pub mod law;
