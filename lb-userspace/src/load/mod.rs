//! Load-driven weights: the control law that levels the backends' utilisation.
//! `law` is pure (time is passed in), so it is tested against a simulated plant;
//! `measure` reads a node's utilisation from the host, a cgroup or a file; `report`
//! serves a backend's figure and fetches the backends'; `control` runs the law in the
//! agent; `config` is the configuration's `load` section.

pub mod config;
pub mod control;
pub mod law;
pub mod measure;
pub mod render;
pub mod report;
