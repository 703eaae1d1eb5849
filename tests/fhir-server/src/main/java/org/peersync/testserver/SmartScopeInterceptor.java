package org.peersync.testserver;

import ca.uhn.fhir.interceptor.api.Hook;
import ca.uhn.fhir.interceptor.api.Interceptor;
import ca.uhn.fhir.interceptor.api.Pointcut;
import ca.uhn.fhir.rest.api.RestOperationTypeEnum;
import ca.uhn.fhir.rest.api.server.IPreResourceShowDetails;
import ca.uhn.fhir.rest.api.server.RequestDetails;
import ca.uhn.fhir.rest.api.server.SystemRequestDetails;
import ca.uhn.fhir.rest.server.exceptions.AuthenticationException;
import ca.uhn.fhir.rest.server.exceptions.ForbiddenOperationException;
import com.nimbusds.jose.JOSEObjectType;
import com.nimbusds.jose.JWSAlgorithm;
import com.nimbusds.jose.jwk.source.JWKSource;
import com.nimbusds.jose.jwk.source.JWKSourceBuilder;
import com.nimbusds.jose.proc.DefaultJOSEObjectTypeVerifier;
import com.nimbusds.jose.proc.JWSVerificationKeySelector;
import com.nimbusds.jose.proc.SecurityContext;
import com.nimbusds.jwt.JWTClaimsSet;
import com.nimbusds.jwt.proc.DefaultJWTClaimsVerifier;
import com.nimbusds.jwt.proc.DefaultJWTProcessor;
import java.net.MalformedURLException;
import java.net.URI;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Enforces SMART on FHIR system scopes (v1 and v2) with bearer tokens issued by a real authorization server.
 *
 * <p>Authentication: every request except {@code GET /metadata} needs {@code Authorization: Bearer <JWT>}; the
 * JWT must be signed by a key in the authorization server's JWK Set, carry the configured issuer (and audience,
 * if set) and be unexpired (no clock-skew allowance, so short-lived tokens expire when they say). Otherwise:
 * 401 with {@code WWW-Authenticate: Bearer error="invalid_token"}.
 *
 * <p>Authorization, per resource type and interaction (SMART v2 letters; v1 {@code read} = rs, {@code write} =
 * cud, {@code *} = cruds): read/vread/history need r, search needs s, a stored create needs c, update u, delete
 * d. Writes are checked where HAPI stores each resource, so the entries of a transaction are checked one by
 * one; a conditional update that creates needs c, one that updates needs u. Other operations ($expunge ...)
 * need {@code system/*.cruds}. Every resource shown to the client is checked too (included and revincluded
 * resources, the pages of a search): a search result or a page needs s on its type, anything else r or s. A
 * missing scope is a 403 whose OperationOutcome names it.
 */
@Interceptor
public class SmartScopeInterceptor {

	private static final Logger ourLog = LoggerFactory.getLogger(SmartScopeInterceptor.class);
	private static final Pattern SCOPE = Pattern.compile("^system/([A-Za-z]+|\\*)\\.(read|write|\\*|[cruds]+)$");
	private static final Set<RestOperationTypeEnum> WRITES = Set.of(RestOperationTypeEnum.CREATE,
			RestOperationTypeEnum.UPDATE, RestOperationTypeEnum.DELETE, RestOperationTypeEnum.PATCH,
			RestOperationTypeEnum.TRANSACTION, RestOperationTypeEnum.BATCH);
	private static final String GRANTS_KEY = SmartScopeInterceptor.class.getName() + ".grants";

	private final DefaultJWTProcessor<SecurityContext> myProcessor;

	public SmartScopeInterceptor(String theJwksUrl, String theIssuer, String theAudience) {
		JWKSource<SecurityContext> keys;
		try {
			keys = JWKSourceBuilder.create(URI.create(theJwksUrl).toURL()).retrying(true).build();
		} catch (MalformedURLException e) {
			throw new IllegalArgumentException("peersync.fhir.auth.jwks-url is not a URL: " + theJwksUrl, e);
		}
		myProcessor = new DefaultJWTProcessor<>();
		// RFC 9068 access tokens are typed at+jwt; plain JWT (or no typ) is what many servers still send.
		myProcessor.setJWSTypeVerifier(new DefaultJOSEObjectTypeVerifier<>(
				new JOSEObjectType("at+jwt"), JOSEObjectType.JWT, null));
		myProcessor.setJWSKeySelector(new JWSVerificationKeySelector<>(
				Set.of(JWSAlgorithm.RS256, JWSAlgorithm.RS384, JWSAlgorithm.ES256, JWSAlgorithm.ES384,
						JWSAlgorithm.PS256),
				keys));
		JWTClaimsSet exact = new JWTClaimsSet.Builder().issuer(theIssuer).build();
		DefaultJWTClaimsVerifier<SecurityContext> claims = new DefaultJWTClaimsVerifier<>(
				(theAudience == null || theAudience.isBlank()) ? null : theAudience, exact, Set.of("exp", "scope"));
		claims.setMaxClockSkew(0);
		myProcessor.setJWTClaimsSetVerifier(claims);
		ourLog.info("SMART scope enforcement is ON (issuer {}, JWK Set {})", theIssuer, theJwksUrl);
	}

	@Hook(Pointcut.SERVER_INCOMING_REQUEST_PRE_HANDLED)
	public void incomingRequest(RequestDetails theRequest, RestOperationTypeEnum theOperation) {
		if (theOperation == RestOperationTypeEnum.METADATA) {
			return;
		}
		Map<String, Set<Character>> grants = grants(theRequest);
		String type = theRequest.getResourceName();
		switch (theOperation) {
			case READ, VREAD, HISTORY_INSTANCE, HISTORY_TYPE -> require(grants, type, 'r', "read");
			case SEARCH_TYPE -> require(grants, type, 's', "search");
			// stored writes are checked per resource below (also inside transactions); what a search or a page
			// shows (includes too) is checked per resource in showing()
			case CREATE, UPDATE, DELETE, PATCH, TRANSACTION, BATCH, GET_PAGE -> {}
			default -> require(grants, "*", null, theOperation.getCode());
		}
	}

	@Hook(Pointcut.STORAGE_PRESTORAGE_RESOURCE_CREATED)
	public void creating(IBaseResource theResource, RequestDetails theRequest) {
		if (isClientRequest(theRequest)) {
			require(grants(theRequest), resourceType(theResource), 'c', "create");
		}
	}

	@Hook(Pointcut.STORAGE_PRESTORAGE_RESOURCE_UPDATED)
	public void updating(IBaseResource theOld, IBaseResource theNew, RequestDetails theRequest) {
		if (isClientRequest(theRequest)) {
			require(grants(theRequest), resourceType(theNew), 'u', "update");
		}
	}

	@Hook(Pointcut.STORAGE_PRESTORAGE_RESOURCE_DELETED)
	public void deleting(IBaseResource theResource, RequestDetails theRequest) {
		if (isClientRequest(theRequest)) {
			require(grants(theRequest), resourceType(theResource), 'd', "delete");
		}
	}

	/**
	 * Every resource about to be shown: a page of a search (GET_PAGE) continues that search, so it needs s on each
	 * type it shows; elsewhere (a search's _include/_revinclude, a read) the token must grant r or s on the type.
	 */
	@Hook(Pointcut.STORAGE_PRESHOW_RESOURCES)
	public void showing(IPreResourceShowDetails theDetails, RequestDetails theRequest) {
		RestOperationTypeEnum operation = isClientRequest(theRequest) ? theRequest.getRestOperationType() : null;
		if (operation == null || WRITES.contains(operation)) {
			return; // a conditional write's match search is the server's own; its result is not shown
		}
		Map<String, Set<Character>> grants = grants(theRequest);
		boolean paging = operation == RestOperationTypeEnum.GET_PAGE;
		for (IBaseResource resource : theDetails) {
			String type = resourceType(resource);
			if (type == null) {
				continue;
			}
			if (paging) {
				require(grants, type, 's', "a page of a search");
			} else if (!allows(grants, type, 'r') && !allows(grants, type, 's')) {
				throw forbidden("showing " + type + " (a read, _include or _revinclude) needs scope system/" + type
						+ ".r or system/" + type + ".s (v1: system/" + type + ".read), which the access token does not grant");
			}
		}
	}

	/** HAPI's own work (jobs, startup) runs with SystemRequestDetails or none: no client, no token to check. */
	private static boolean isClientRequest(RequestDetails theRequest) {
		return theRequest != null && !(theRequest instanceof SystemRequestDetails);
	}

	/** The validated token's grants (type or "*" -> permission letters), cached on the request. */
	@SuppressWarnings("unchecked")
	private Map<String, Set<Character>> grants(RequestDetails theRequest) {
		Object cached = theRequest.getUserData().get(GRANTS_KEY);
		if (cached != null) {
			return (Map<String, Set<Character>>) cached;
		}
		String header = theRequest.getHeader("Authorization");
		if (header == null || !header.regionMatches(true, 0, "Bearer ", 0, 7)) {
			throw unauthorized("no bearer token: this server requires SMART Backend Services authorization");
		}
		JWTClaimsSet claims;
		try {
			claims = myProcessor.process(header.substring(7).trim(), null);
		} catch (Exception e) {
			// Name the reason (expired, bad signature, unknown key, wrong issuer), never the token itself.
			throw unauthorized("the bearer token is invalid: " + e.getMessage());
		}
		Map<String, Set<Character>> grants = parseScopes(claims.getClaim("scope"));
		theRequest.getUserData().put(GRANTS_KEY, grants);
		return grants;
	}

	static Map<String, Set<Character>> parseScopes(Object theScopeClaim) {
		Map<String, Set<Character>> grants = new HashMap<>();
		String text = theScopeClaim instanceof String s ? s : "";
		for (String scope : text.trim().split("\\s+")) {
			Matcher m = SCOPE.matcher(scope);
			if (!m.matches()) {
				continue; // openid, patient/ and user/ scopes grant a backend service nothing here
			}
			String letters = switch (m.group(2)) {
				case "read" -> "rs";
				case "write" -> "cud";
				case "*" -> "cruds";
				default -> m.group(2);
			};
			Set<Character> perms = grants.computeIfAbsent(m.group(1), k -> new HashSet<>());
			letters.chars().forEach(c -> perms.add((char) c));
		}
		return grants;
	}

	/** Throws 403 naming the missing scope unless the grants cover {@code theLetter} on {@code theType}. */
	private static void require(Map<String, Set<Character>> theGrants, String theType, Character theLetter, String theWhat) {
		if (theLetter == null) {
			Set<Character> all = theGrants.getOrDefault("*", Set.of());
			if (!all.containsAll(Set.of('c', 'r', 'u', 'd', 's'))) {
				throw forbidden(theWhat + " needs scope system/*.cruds (v1: system/*.*)");
			}
			return;
		}
		if (theType == null || allows(theGrants, theType, theLetter)) {
			return;
		}
		String v1 = "rs".indexOf(theLetter) >= 0 ? "read" : "write";
		throw forbidden(theWhat + " of " + theType + " needs scope system/" + theType + "." + theLetter
				+ " (v1: system/" + theType + "." + v1 + "), which the access token does not grant");
	}

	private static boolean allows(Map<String, Set<Character>> theGrants, String theType, char theLetter) {
		return theGrants.getOrDefault(theType, Set.of()).contains(theLetter)
				|| theGrants.getOrDefault("*", Set.of()).contains(theLetter);
	}

	private static String resourceType(IBaseResource theResource) {
		return theResource == null ? null : theResource.fhirType();
	}

	private static AuthenticationException unauthorized(String theMessage) {
		AuthenticationException e = new AuthenticationException(theMessage);
		e.addResponseHeader("WWW-Authenticate", "Bearer error=\"invalid_token\"");
		return e;
	}

	private static ForbiddenOperationException forbidden(String theMessage) {
		ForbiddenOperationException e = new ForbiddenOperationException("insufficient_scope: " + theMessage);
		e.addResponseHeader("WWW-Authenticate", "Bearer error=\"insufficient_scope\"");
		return e;
	}
}
