//! `lb man DIR` puts each page in its section's directory, where `man` finds it.

use std::process::Command;

#[test]
fn man_pages_go_to_their_sections() {
    let dir = std::env::temp_dir().join(format!("lb-man-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .arg("man")
        .arg(&dir)
        .output()
        .unwrap();
    let found = |p: &str| dir.join(p).is_file();
    let (lb1, list1, json5) = (
        found("man1/lb.1"),
        found("man1/lb-list.1"),
        found("man5/lb.json.5"),
    );
    let stray = found("man1/lb.json.5") || found("lb.1");
    let agent = std::fs::read_to_string(dir.join("man1/lb-agent.1")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    assert!(lb1 && list1 && json5 && !stray, "pages misplaced: {out:?}");
    // lb-agent(1) tells the signals and the environment.
    for word in ["SIGHUP", "SIGTERM", "LB_LOG", "LB_SOCKET"] {
        assert!(agent.contains(word), "lb-agent.1 lacks {word}:\n{agent}");
    }
}
