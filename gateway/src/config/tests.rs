use super::*;

const MINIMAL: &str = r#"
[gateway]
ae_title = "GW"
[[listen]]
address = "0.0.0.0:104"
"#;

fn invalid(text: &str) -> String {
    match Config::parse(text, "test.toml") {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn embedded_default_is_valid_and_loopback_only() {
    let c = Config::embedded_default();
    assert_eq!(c.gateway.ae_title.as_str(), "DICOM_GW");
    assert_eq!(c.listen[0].address, "127.0.0.1:11112".parse().unwrap());
    assert_eq!(c.gateway.data_dir, PathBuf::from("./gateway-data"));
    assert!(c.accepts_any_calling_ae());
    assert!(c
        .dangerous
        .any_calling_ae_from
        .iter()
        .all(|n| n.addr().is_loopback()));
}

#[test]
fn defaults_apply() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.gateway.max_associations.get(), DEFAULT_MAX_ASSOCIATIONS);
    assert_eq!(c.gateway.max_pdu_length, DEFAULT_MAX_PDU_LENGTH);
    assert_eq!(
        c.gateway.artim_timeout,
        Duration::from_secs(DEFAULT_ARTIM_TIMEOUT_SECS)
    );
    assert_eq!(c.gateway.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    assert_eq!(
        c.gateway.min_free_disk_bytes,
        DEFAULT_MIN_FREE_DISK_MB * 1024 * 1024
    );
    assert_eq!(c.log.level, log::LevelFilter::Info);
    assert!(!c.accepts_any_calling_ae());
}

#[test]
fn long_ae_title_names_key_line_and_limit() {
    let e = invalid(&format!(
        "{MINIMAL}\n[[modality]]\nae_title = \"CT01\"\nhosts = [\"10.0.0.1\"]\n[[modality]]\nae_title = \"CT ROOM 1 MAIN SCANNER\"\nhosts = [\"10.0.0.2\"]\n"
    ));
    assert!(e.contains("modality[1].ae_title"), "{e}");
    assert!(e.contains("22 characters"), "{e}");
    assert!(e.contains("at most 16"), "{e}");
    assert!(e.starts_with("test.toml:11:"), "{e}");
}

#[test]
fn unknown_key_is_an_error_with_line() {
    let e = invalid(&format!("{MINIMAL}\n[gateway2]\nx = 1\n"));
    assert!(e.contains("gateway2"), "{e}");
    let e = invalid(
        "[gateway]\nae_title = \"GW\"\nae_tittle = \"X\"\n[[listen]]\naddress = \"0.0.0.0:104\"\n",
    );
    assert!(e.contains("ae_tittle") && e.contains("test.toml: 3"), "{e}");
}

#[test]
fn bad_values_are_explained() {
    let e = invalid(&format!(
        "{MINIMAL}\n[[modality]]\nae_title = \"CT\"\nhosts = [\"10.0.0.0/33\"]\n"
    ));
    assert!(
        e.contains("modality[0].hosts[0]") && e.contains("CIDR"),
        "{e}"
    );
    let e = invalid(&format!(
        "{MINIMAL}\n[[modality]]\nae_title = \"CT\"\nhosts = []\n"
    ));
    assert!(
        e.contains("modality[0].hosts") && e.contains("empty"),
        "{e}"
    );
    let e = invalid(&format!(
        "{MINIMAL}\n[[modality]]\nae_title = \"CT\"\nhosts = [\"10.0.0.1\"]\n[[modality]]\nae_title = \"CT \"\nhosts = [\"10.0.0.2\"]\n"
    ));
    assert!(e.contains("registered twice"), "{e}");
    let e = invalid("[gateway]\nae_title = \"A\\\\B\"\n[[listen]]\naddress = \"0.0.0.0:104\"\n");
    assert!(
        e.contains("gateway.ae_title") && e.contains("backslash"),
        "{e}"
    );
    let e = invalid("[gateway]\nae_title = \"GW\"\nmax_pdu_length = 100\n[[listen]]\naddress = \"0.0.0.0:104\"\n");
    assert!(
        e.contains("gateway.max_pdu_length") && e.contains("16384"),
        "{e}"
    );
    let e = invalid("[gateway]\nae_title = \"GW\"\nidle_timeout_secs = 0\n[[listen]]\naddress = \"0.0.0.0:104\"\n");
    assert!(e.contains("gateway.idle_timeout_secs"), "{e}");
    let e = invalid("[gateway]\nae_title = \"GW\"\n[[listen]]\naddress = \"localhost:104\"\n");
    assert!(e.contains("listen[0].address"), "{e}");
    let e = invalid("[gateway]\nae_title = \"GW\"\n");
    assert!(e.contains("[[listen]]"), "{e}");
    let e = invalid(&format!("{MINIMAL}\n[log]\nlevel = \"loud\"\n"));
    assert!(e.contains("log.level"), "{e}");
}

#[test]
fn ae_titles_trim_padding_and_accept_hosts_and_networks() {
    let c = Config::parse(
        &format!("{MINIMAL}\n[[modality]]\nae_title = \" CT01 \"\nhosts = [\"10.0.0.1\", \"10.1.0.0/16\", \"::1\"]\n"),
        "t",
    )
    .unwrap();
    assert_eq!(c.modalities[0].ae_title.as_str(), "CT01");
    assert_eq!(c.modalities[0].hosts.len(), 3);
    assert!(c.modalities[0].hosts[1].contains(&"10.1.200.3".parse::<IpAddr>().unwrap()));
}

/// The example file documents every key: it must parse, and it must not drift from the defaults.
#[test]
fn example_file_is_valid() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/gateway.example.toml"
    );
    let c = Config::load(Path::new(path)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.gateway.max_pdu_length, DEFAULT_MAX_PDU_LENGTH);
    assert_eq!(c.gateway.max_associations.get(), DEFAULT_MAX_ASSOCIATIONS);
    assert_eq!(
        c.gateway.idle_timeout,
        Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS)
    );
    assert_eq!(
        c.gateway.min_free_disk_bytes,
        DEFAULT_MIN_FREE_DISK_MB << 20
    );
}

#[test]
fn destinations_with_defaults_and_routes() {
    let c = Config::parse(
        &format!(
            "{MINIMAL}\n[[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\naddress = \"pacs.local:104\"\n[[destination]]\nname = \"lab\"\nae_title = \"LAB\"\naddress = \"10.0.0.9:11112\"\ncalling_ae = \"GW2\"\n[destination.route]\nmodality = [\"CT\"]\n"
        ),
        "t",
    )
    .unwrap();
    let d = &c.destinations[0];
    assert_eq!(d.calling_ae.as_str(), "GW");
    assert_eq!(d.max_associations, DEFAULT_DEST_MAX_ASSOCIATIONS);
    assert_eq!(
        d.retry_initial,
        Duration::from_secs(DEFAULT_RETRY_INITIAL_SECS)
    );
    assert_eq!(d.give_up_after, None);
    assert_eq!(c.destinations[1].calling_ae.as_str(), "GW2");
    assert_eq!(c.route("CT01", "CT", "1.2"), vec!["pacs", "lab"]);
    assert_eq!(c.route("MR01", "MR", "1.2"), vec!["pacs"]);
}

#[test]
fn bad_destinations_are_explained() {
    let dest = |body: &str| format!("{MINIMAL}\n[[destination]]\n{body}\n");
    let e = invalid(&dest(
        "name = \"a b\"\nae_title = \"P\"\naddress = \"h:104\"",
    ));
    assert!(e.contains("destination[0].name"), "{e}");
    let e = invalid(&dest("name = \"p\"\nae_title = \"P\"\naddress = \"h\""));
    assert!(
        e.contains("destination[0].address") && e.contains("host:port"),
        "{e}"
    );
    let e = invalid(&dest(
        "name = \"p\"\nae_title = \"P\"\naddress = \"h:1\"\nmax_associations = 0",
    ));
    assert!(e.contains("destination[0].max_associations"), "{e}");
    let e = invalid(&dest("name = \"p\"\nae_title = \"P\"\naddress = \"h:1\"\nretry_initial_secs = 60\nretry_max_secs = 10"));
    assert!(e.contains("retry_max_secs"), "{e}");
    let e = invalid(&dest("name = \"p\"\nae_title = \"P\"\naddress = \"h:1\"\n[destination.route]\nsop_class = [\"CT\"]"));
    assert!(e.contains("destination[0].route.sop_class[0]"), "{e}");
    let e = invalid(&format!(
        "{}{}",
        dest("name = \"p\"\nae_title = \"P\"\naddress = \"h:1\""),
        "[[destination]]\nname = \"p\"\nae_title = \"Q\"\naddress = \"h:2\"\n"
    ));
    assert!(e.contains("used twice"), "{e}");
}
