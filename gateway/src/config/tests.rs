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
    assert_eq!(c.gateway.spare_segments, DEFAULT_SPARE_SEGMENTS as usize);
    assert_eq!(c.log.level, log::LevelFilter::Info);
    assert!(!c.accepts_any_calling_ae());
}

#[test]
fn spare_segments_are_bounded_and_can_be_off() {
    let with = |n: &str| {
        MINIMAL.replace(
            "ae_title = \"GW\"",
            &format!("ae_title = \"GW\"\nspare_segments = {n}"),
        )
    };
    assert_eq!(
        Config::parse(&with("0"), "t")
            .unwrap()
            .gateway
            .spare_segments,
        0
    );
    let e = invalid(&with("65"));
    assert!(e.contains("gateway.spare_segments"), "{e}");
    assert!(e.contains("allowed 0 (off) to 64"), "{e}");
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

// ---- DICOM TLS (issue 4) --------------------------------------------------------------------

const TLS_LISTEN: &str = r#"
[[listen]]
address = "0.0.0.0:2762"
tls = { certificate = "/etc/gw/gw.crt", private_key = "/etc/gw/gw.key", client_ca = "/etc/gw/ca.crt" }
"#;

#[test]
fn tls_listener_requires_client_certificates_by_default() {
    let c = Config::parse(&format!("{MINIMAL}{TLS_LISTEN}"), "t").unwrap();
    assert!(c.listen[0].tls.is_none());
    let t = c.listen[1].tls.as_ref().unwrap();
    assert!(t.require_client_certificate);
    assert_eq!(t.client_ca.as_deref(), Some(Path::new("/etc/gw/ca.crt")));
    assert_eq!(t.private_key, PathBuf::from("/etc/gw/gw.key"));
    assert!(!c.dangerous.allow_tls_without_client_certificate);
}

#[test]
fn tls_listener_problems_are_explained() {
    let listen = |tls: &str| {
        format!("{MINIMAL}\n[[listen]]\naddress = \"0.0.0.0:2762\"\ntls = {{ {tls} }}\n")
    };
    // No client CA while client certificates are required.
    let e = invalid(&listen(
        "certificate = \"/a.crt\", private_key = \"/a.key\"",
    ));
    assert!(
        e.contains("listen[1].tls.client_ca") && e.contains("is missing"),
        "{e}"
    );
    // Optional client certificates only with the [dangerous] switch.
    let optional = listen(
        "certificate = \"/a.crt\", private_key = \"/a.key\", require_client_certificate = false",
    );
    let e = invalid(&optional);
    assert!(
        e.contains("listen[1].tls.require_client_certificate")
            && e.contains("allow_tls_without_client_certificate"),
        "{e}"
    );
    let c = Config::parse(
        &format!("{optional}\n[dangerous]\nallow_tls_without_client_certificate = true\n"),
        "t",
    )
    .unwrap();
    let t = c.listen[1].tls.as_ref().unwrap();
    assert!(!t.require_client_certificate && t.client_ca.is_none());
    // Relative paths, missing keys, unknown keys, port 0.
    let e = invalid(&listen(
        "certificate = \"gw.crt\", private_key = \"/a.key\", client_ca = \"/ca\"",
    ));
    assert!(
        e.contains("listen[1].tls.certificate") && e.contains("absolute"),
        "{e}"
    );
    let e = invalid(&listen("certificate = \"/a.crt\", client_ca = \"/ca\""));
    assert!(e.contains("private_key"), "{e}");
    let e = invalid(&listen(
        "certificate = \"/a.crt\", private_key = \"/a.key\", client_ca = \"/ca\", ciphers = \"ALL\"",
    ));
    assert!(e.contains("ciphers"), "{e}");
    let e = invalid(&format!(
        "{MINIMAL}\n[[listen]]\naddress = \"0.0.0.0:0\"\ntls = {{ certificate = \"/a\", private_key = \"/b\", client_ca = \"/c\" }}\n"
    ));
    assert!(e.contains("fixed port"), "{e}");
}

#[test]
fn modality_pins_and_allow_plain() {
    let fp = vec!["a1"; 32].join(":");
    let c = Config::parse(
        &format!(
            "{MINIMAL}\n[[modality]]\nae_title = \"A\"\nhosts = [\"10.0.0.1\"]\ncertificate_sha256 = \"{fp}\"\n\
             [[modality]]\nae_title = \"B\"\nhosts = [\"10.0.0.2\"]\ncertificate_subject = \"CN = B, O = Hospital\"\n\
             [[modality]]\nae_title = \"C\"\nhosts = [\"10.0.0.3\"]\nallow_plain = false\n\
             [[modality]]\nae_title = \"D\"\nhosts = [\"10.0.0.4\"]\n"
        ),
        "t",
    )
    .unwrap();
    let m = &c.modalities;
    assert_eq!(m[0].certificate_sha256, Some([0xA1; 32]));
    assert!(!m[0].allow_plain && m[0].has_pin());
    assert_eq!(
        m[1].certificate_subject
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("CN=B, O=Hospital")
    );
    assert!(!m[1].allow_plain);
    assert!(!m[2].allow_plain && !m[2].has_pin());
    assert!(m[3].allow_plain && !m[3].has_pin());

    let modality = |extra: &str| {
        format!("{MINIMAL}\n[[modality]]\nae_title = \"A\"\nhosts = [\"10.0.0.1\"]\n{extra}\n")
    };
    let e = invalid(&modality(
        "certificate_subject = \"CN=A\"\nallow_plain = true",
    ));
    assert!(
        e.contains("modality[0].allow_plain") && e.contains("pin"),
        "{e}"
    );
    let e = invalid(&modality("certificate_sha256 = \"12:34\""));
    assert!(
        e.contains("modality[0].certificate_sha256") && e.contains("64 hex"),
        "{e}"
    );
    let e = invalid(&modality("certificate_subject = \"just a name\""));
    assert!(
        e.contains("modality[0].certificate_subject") && e.contains("TYPE=VALUE"),
        "{e}"
    );
}

#[test]
fn destination_tls_defaults_and_problems() {
    let dest = |address: &str, tls: &str| {
        format!("{MINIMAL}\n[[destination]]\nname = \"p\"\nae_title = \"P\"\naddress = \"{address}\"\n{tls}\n")
    };
    let c = Config::parse(&dest("pacs.example.org:2762", "[destination.tls]"), "t").unwrap();
    let t = c.destinations[0].tls.as_ref().unwrap();
    assert_eq!(t.server_name, "pacs.example.org");
    assert_eq!(t.ca, None);
    assert_eq!(
        (t.certificate.as_ref(), t.private_key.as_ref()),
        (None, None)
    );
    let c = Config::parse(&dest("[::1]:2762", "tls = { ca = \"/ca.pem\" }"), "t").unwrap();
    let t = c.destinations[0].tls.as_ref().unwrap();
    assert_eq!(t.server_name, "::1");
    assert_eq!(t.ca.as_deref(), Some(Path::new("/ca.pem")));
    let c = Config::parse(
        &dest(
            "10.0.0.9:2762",
            "tls = { server_name = \"pacs.example.org\", certificate = \"/c.crt\", private_key = \"/c.key\" }",
        ),
        "t",
    )
    .unwrap();
    let t = c.destinations[0].tls.as_ref().unwrap();
    assert_eq!(t.server_name, "pacs.example.org");
    assert_eq!(t.private_key.as_deref(), Some(Path::new("/c.key")));
    assert!(c.destinations[0].tls.is_some());
    // No tls: plain.
    let c = Config::parse(&dest("h:104", ""), "t").unwrap();
    assert!(c.destinations[0].tls.is_none());

    let e = invalid(&dest("h:1", "tls = { certificate = \"/c.crt\" }"));
    assert!(
        e.contains("destination[0].tls.certificate") && e.contains("both"),
        "{e}"
    );
    let e = invalid(&dest("h:1", "tls = { server_name = \"bad name!\" }"));
    assert!(e.contains("destination[0].tls.server_name"), "{e}");
    let e = invalid(&dest("h:1", "tls = { ca = \"ca.pem\" }"));
    assert!(
        e.contains("destination[0].tls.ca") && e.contains("absolute"),
        "{e}"
    );
}

/// The example file documents the TLS keys with values that parse.
#[test]
fn example_file_shows_tls_on_both_sides() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/gateway.example.toml"
    );
    let c = Config::load(Path::new(path)).unwrap_or_else(|e| panic!("{e}"));
    assert!(c
        .listen
        .iter()
        .any(|l| l.tls.as_ref().is_some_and(|t| t.require_client_certificate)));
    assert!(c.modalities.iter().any(Modality::has_pin));
    assert!(c.destinations.iter().any(|d| d.tls.is_some()));
    assert!(!c.dangerous.allow_tls_without_client_certificate);
}
