//! Not running as root: the service either gets CAP_NET_BIND_SERVICE from its unit and runs as
//! its own user from the start, or, started as root, binds its listeners and then switches to
//! `gateway.run_as`. Root without `run_as` is refused unless `[dangerous] allow_root = true`.

use std::path::Path;

use nix::unistd::{self, Gid, Uid, User};

/// Switches to `run_as` when running as root (after the listeners are bound), or refuses root.
/// Returns a line for the log describing what was done.
pub fn drop_or_refuse(
    run_as: Option<&str>,
    allow_root: bool,
    data_dir: &Path,
) -> Result<String, String> {
    if !Uid::effective().is_root() {
        return Ok(format!("running as uid {}", Uid::effective()));
    }
    let Some(name) = run_as else {
        return if allow_root {
            Ok("running as root ([dangerous] allow_root = true)".into())
        } else {
            Err("refusing to run as root: set gateway.run_as = \"dicom-gateway\" (the gateway binds its ports, then switches to that user), run it from the systemd unit (User=dicom-gateway), or set [dangerous] allow_root = true".into())
        };
    };
    let user = User::from_name(name)
        .map_err(|e| format!("gateway.run_as: cannot look up user '{name}': {e}"))?
        .ok_or_else(|| format!("gateway.run_as: no user '{name}' on this system (create it: systemd-sysusers, or useradd --system {name})"))?;
    if user.uid.is_root() {
        return Err(format!(
            "gateway.run_as: '{name}' is root; name an unprivileged user"
        ));
    }
    // The data directory must belong to the service user; create it if needed.
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    unistd::chown(data_dir, Some(user.uid), Some(user.gid))
        .map_err(|e| format!("cannot give {} to {name}: {e}", data_dir.display()))?;
    switch(user.uid, user.gid).map_err(|e| format!("cannot switch to user '{name}': {e}"))?;
    if Uid::effective().is_root() || Uid::current().is_root() {
        return Err(format!("still root after switching to '{name}'"));
    }
    Ok(format!(
        "switched to user {name} (uid {}, gid {}) after binding",
        user.uid, user.gid
    ))
}

/// Groups first, then gid, then uid: once the uid is dropped the others cannot be changed.
/// glibc applies these to every thread of the process.
fn switch(uid: Uid, gid: Gid) -> nix::Result<()> {
    unistd::setgroups(&[gid])?;
    unistd::setgid(gid)?;
    unistd::setuid(uid)
}
