//! Load-driven weights: the control law that levels the backends' utilisation.
//! `law` is pure (time is passed in), so it is tested against a simulated plant;
//! `measure` reads a node's utilisation from the host, a cgroup or a file.

pub mod law;
pub mod measure;
