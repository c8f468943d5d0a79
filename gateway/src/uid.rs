//! UIDs of the gateway itself and validation of UIDs received from the network.

/// Implementation Class UID (PS3.7 Annex D.3.3.2), a 2.25 UUID-derived UID of this product.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.235260772123131619143326794295094080418";

/// Implementation Version Name: at most 16 characters (VR SH).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("DCMGW_", env!("CARGO_PKG_VERSION"));

/// Verification SOP Class (PS3.4 Annex A).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// DICOM Application Context Name (PS3.7 Annex A.2.1).
pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";

/// Implicit VR Little Endian, the default transfer syntax (PS3.5 section 10.1).
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// Trims the padding a UID may carry on the wire (PS3.5 section 9.1: a trailing NUL) and
/// checks the syntax: 1 to 64 characters, digits and dots, no empty component.
///
/// Leading zeros in components are tolerated: real modalities send them.
pub fn validate(raw: &str) -> Option<&str> {
    let uid = raw.trim_end_matches(['\0', ' ']).trim_start_matches(' ');
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !uid.split('.').any(str::is_empty);
    ok.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_uids() {
        assert_eq!(validate("1.2.840.10008.1.1\0"), Some("1.2.840.10008.1.1"));
        assert_eq!(validate("../../etc/passwd"), None);
        assert_eq!(validate("/abs"), None);
        assert_eq!(validate("1..2"), None);
        assert_eq!(validate(""), None);
        assert_eq!(validate(&"1".repeat(65)), None);
        assert!(IMPLEMENTATION_VERSION_NAME.len() <= 16);
        assert!(validate(IMPLEMENTATION_CLASS_UID).is_some());
    }
}
