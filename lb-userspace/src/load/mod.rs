//! Load-driven weights: the control law that levels the backends' utilisation.
//! `law` is pure (time is passed in), so it is tested against a simulated plant;
//! `measure` reads a node's utilisation from the host, a cgroup or a file; `report`
//! serves a backend's figure and fetches the backends'; `control` runs the law in the
//! agent; `fleet` is the loop in a fleet (reports and weights through the store, one
//! elected controller); `config` is the configuration's `load` section.

pub mod config;
pub mod control;
pub mod fleet;
pub mod law;
pub mod measure;
pub mod render;
pub mod report;
